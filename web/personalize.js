// Shows the run summary a Personalize node returns in ui.text (LoRA file, steps, run folder) under the node.
import { app } from "../../scripts/app.js";

app.registerExtension({
    name: "Personalize.RunSummary",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData.name.startsWith("Personalize")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = message?.text?.join("\n");
            if (!text) return;
            let widget = this.widgets?.find((w) => w.name === "personalize_summary");
            if (!widget) {
                widget = this.addWidget("text", "personalize_summary", "", () => {}, { serialize: false });
                widget.disabled = true;
            }
            widget.value = text;
            this.setDirtyCanvas(true, true);
        };
    },
});
