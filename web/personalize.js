// Personalize's canvas helpers: the run summary under a node after it ran, and on trainer nodes what the picked
// base model means for the settings (SDXL: its own 1024 px, frozen text encoders, memory) before anything runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// A read-only line of text under the node (not saved with the workflow).
function showText(node, name, text) {
    let widget = node.widgets?.find((w) => w.name === name);
    if (!text && !widget) return;
    if (!widget) {
        widget = node.addWidget("text", name, "", () => {}, { serialize: false });
        widget.serialize = false;
        widget.disabled = true;
    }
    widget.value = text || "";
    node.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "Personalize.RunSummary",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData.name.startsWith("Personalize")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            if (message?.table) return;  // Compare Models: live.js renders the same table as HTML
            const text = message?.text?.join("\n");
            if (text) showText(this, "personalize_summary", text);
        };
    },
});

// Settings whose values change the note; the route reads the checkpoint's header only.
const NOTE_INPUTS = ["ckpt_name", "resolution", "train_text_encoder", "which_text_encoders", "gradient_checkpointing",
    "method"];

async function updateBaseNote(node) {
    const value = (name) => node.widgets?.find((w) => w.name === name)?.value;
    const query = new URLSearchParams();
    for (const name of NOTE_INPUTS) {
        if (value(name) !== undefined) query.set(name === "ckpt_name" ? "name" : name, String(value(name)));
    }
    try {
        const response = await api.fetchApi(`/personalize/base_model?${query}`);
        const body = await response.json();
        showText(node, "personalize_base", body.note || body.error || "");
    } catch (e) {
        showText(node, "personalize_base", "");  // an older server without the route: no note
    }
}

app.registerExtension({
    name: "Personalize.BaseModelNote",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        const inputs = nodeData.input?.required ?? {};
        if (!nodeData.name.startsWith("Personalize") || !("ckpt_name" in inputs) || !("resolution" in inputs)) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            onNodeCreated?.apply(this, arguments);
            for (const widget of this.widgets ?? []) {
                if (!NOTE_INPUTS.includes(widget.name)) continue;
                const callback = widget.callback;
                widget.callback = (...args) => {
                    const result = callback?.apply(widget, args);
                    updateBaseNote(this);
                    return result;
                };
            }
            updateBaseNote(this);
        };
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function () {
            onConfigure?.apply(this, arguments);
            updateBaseNote(this);  // a loaded workflow's values
        };
    },
});
