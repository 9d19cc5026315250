// The fleet API over fetch, with the bearer token; errors become ApiError with the server's
// own message (FastAPI's "detail").

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  return JSON.stringify(detail);
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== null && v !== undefined && v !== "") q.set(k, v);
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

/** `token()` gives the current token; `onUnauthorized()` is called on a 401. */
export function makeApi(token, onUnauthorized) {
  // `body` is sent as JSON; `file` (a File or Blob) is sent as it is, as raw bytes.
  async function request(method, path, { body, file, params } = {}) {
    const headers = { Authorization: `Bearer ${token()}`, Accept: "application/json" };
    let payload;
    if (file !== undefined) {
      headers["Content-Type"] = "application/octet-stream";
      payload = file;
    } else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path + query(params), { method, headers, body: payload });
    } catch (e) {
      throw new ApiError(0, `the fleet service did not answer (${e.message})`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = { detail: text };
    }
    if (!response.ok) {
      const detail = data && data.detail !== undefined ? describe(data.detail) : response.statusText;
      if (response.status === 401) onUnauthorized(detail);
      throw new ApiError(response.status, detail);
    }
    return data;
  }
  return {
    get: (path, params) => request("GET", path, { params }),
    post: (path, body, params) => request("POST", path, { body, params }),
    upload: (path, file) => request("POST", path, { file }),
  };
}
