// A confirmation dialog on the native <dialog> element: modal, focus kept inside, Escape
// cancels. Resolves to {confirmed, choice}; the Cancel button has the focus at first, so an
// accidental Enter does nothing harmful.

import { h } from "./dom.js";

/**
 * confirmAction({title, message, confirmLabel, choices: [{value, label, checked}]})
 */
export function confirmAction({ title, message, confirmLabel, choices = [], danger = false }) {
  return new Promise((resolve) => {
    const titleId = `dialog-title-${Date.now()}`;
    const radios = choices.map((c, i) =>
      h(
        "label",
        { class: "choice" },
        h("input", { type: "radio", name: "choice", value: c.value, checked: c.checked ?? i === 0 }),
        ` ${c.label}`,
      ),
    );
    const cancel = h("button", { type: "button", class: "secondary", value: "cancel" }, "Cancel");
    const confirm = h("button", { type: "submit", class: danger ? "danger" : "primary", value: "confirm" }, confirmLabel);
    const form = h(
      "form",
      { method: "dialog" },
      h("h2", { id: titleId }, title),
      typeof message === "string" ? h("p", {}, message) : message,
      radios.length ? h("fieldset", {}, h("legend", {}, "Choose"), radios) : null,
      h("div", { class: "dialog-buttons" }, cancel, confirm),
    );
    const dialog = h("dialog", { "aria-labelledby": titleId, class: "confirm" }, form);
    let result = { confirmed: false, choice: null };
    cancel.addEventListener("click", () => dialog.close());
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const picked = form.querySelector("input[name=choice]:checked");
      result = { confirmed: true, choice: picked ? picked.value : null };
      dialog.close();
    });
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(result);
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}
