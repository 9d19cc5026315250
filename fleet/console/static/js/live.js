// Live updates: watch one topic over server-sent events. EventSource cannot send the
// Authorization header, so each stream opens with a short-lived ticket from
// POST /api/v1/console/ticket (docs/adr/0006). The server ends a stream after a while with
// "bye"; we then reconnect with a fresh ticket. A failed stream is retried after a second.

const RETRY_MS = 1000;

/**
 * Calls onUpdate(snapshot) whenever the topic's snapshot changes, onProblem({detail, status})
 * when the topic is gone, and onState("live" | "reconnecting") as the connection changes.
 * Returns a function that stops watching.
 */
export function watch(api, topic, { onUpdate, onProblem = () => {}, onState = () => {} }) {
  let source = null;
  let timer = null;
  let stopped = false;

  function retry() {
    if (stopped) return;
    onState("reconnecting");
    clearTimeout(timer);
    timer = setTimeout(open, RETRY_MS);
  }

  async function open() {
    if (stopped) return;
    let ticket;
    try {
      ticket = (await api.post("/api/v1/console/ticket")).ticket;
    } catch {
      retry();
      return;
    }
    if (stopped) return;
    const params = new URLSearchParams({ topic, ticket });
    source = new EventSource(`/api/v1/console/live?${params}`);
    source.addEventListener("open", () => onState("live"));
    source.addEventListener("update", (e) => onUpdate(JSON.parse(e.data)));
    source.addEventListener("problem", (e) => onProblem(JSON.parse(e.data)));
    source.addEventListener("bye", () => {
      source.close();
      open();
    });
    source.addEventListener("error", () => {
      source.close();
      retry();
    });
  }

  open();
  return () => {
    stopped = true;
    clearTimeout(timer);
    if (source) source.close();
  };
}
