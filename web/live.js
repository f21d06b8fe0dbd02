// While a trainer node runs: its loss chart, step/ETA line, latest validation image and a link to the run
// folder's files, drawn from the "personalize.train" messages the engine sends (trainers/training/live.py).
// After Compare Models runs: its table as HTML. Nothing is built until a node gets one of these, so a page
// without trainer nodes pays for one event listener. Imports are relative: any pack folder name works.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LINE = "#f0a030", SMOOTH = "#ffffff", GRID = "#444", BACKGROUND = "#1b1b1b";

function el(tag, style = "", text = "") {
    const e = document.createElement(tag);
    e.style.cssText = style;
    if (text) e.textContent = text;
    return e;
}

// An execution id is "<node>" or, inside subgraphs, "<subgraph node>:...:<node>".
function nodeByExecutionId(id) {
    let graph = app.rootGraph ?? app.graph, node = null;
    for (const part of String(id).split(":")) {
        node = graph?.getNodeById(part);
        graph = node?.subgraph;
    }
    return node;
}

const viewUrl = (ref) => api.apiURL(`/view?${new URLSearchParams({ filename: ref.filename,
    subfolder: ref.subfolder ?? "", type: ref.type ?? "output" })}`);

function duration(seconds) {
    if (!(seconds >= 0)) return "";
    if (seconds < 90) return `${Math.round(seconds)} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    return `${Math.floor(seconds / 3600)} h ${String(Math.round(seconds / 60) % 60).padStart(2, "0")}`;
}

// A node's widget holding a DOM element, kept out of the saved workflow and of the prompt.
function domWidget(node, name, element, height) {
    const widget = node.addDOMWidget(name, name, element, { serialize: false, hideOnZoom: false,
        getMinHeight: height, getMaxHeight: height });
    widget.serialize = false;
    widget.serializeValue = () => undefined;
    return widget;
}

class LivePanel {
    constructor(node) {
        this.node = node;
        this.points = [];  // [step, loss], ascending steps
        this.run = null;
        this.root = el("div", "display:flex;flex-direction:column;gap:4px;font:12px sans-serif;color:#ddd;" +
            "width:100%;height:100%;box-sizing:border-box;overflow:hidden");
        this.text = el("div", "white-space:nowrap;overflow:hidden;text-overflow:ellipsis", "waiting for step 1");
        this.text.className = "personalize-live-text";
        this.canvas = el("canvas", `width:100%;height:120px;background:${BACKGROUND};border-radius:4px`);
        this.canvas.className = "personalize-live-chart";
        this.image = el("img", "display:none;max-width:100%;height:160px;object-fit:contain;align-self:center");
        this.image.className = "personalize-live-image";
        this.files = el("details", "");
        this.summary = el("summary", "cursor:pointer;color:#8cf");
        this.list = el("div", "max-height:120px;overflow:auto;display:flex;flex-direction:column");
        this.files.append(this.summary, this.list);
        this.files.addEventListener("toggle", () => this.files.open && this.listFiles());
        this.root.append(this.text, this.canvas, this.image, this.files);
        this.files.style.display = "none";
        this.widget = domWidget(node, "personalize_live", this.root, () => (this.image.src ? 350 : 180));
        this.fit();
    }

    fit() {  // grow the node to show the panel (never shrink what the user sized)
        const [w, h] = this.node.computeSize();
        this.node.setSize([Math.max(this.node.size[0], w), Math.max(this.node.size[1], h)]);
        this.node.setDirtyCanvas(true, true);
    }

    setRun(run) {
        if (run === this.run) return;
        this.run = run;
        this.points = [];
        this.summary.textContent = `run folder: ${run}`;
        this.files.style.display = "";
        this.files.open = false;
    }

    // One step's message: a point for the chart (a new run, a gap or a page opened mid-run reads the log first).
    update(d) {
        this.setRun(d.run);
        if (typeof d.loss === "number" && d.step > 0) {
            const before = this.points.filter(([step]) => step < d.step);  // a resumed run redoes later steps
            const prev = before[before.length - 1];
            this.points = [...before, [d.step, d.loss]];
            if (d.step > 1 && (!prev || prev[0] < d.step - 1)) this.backfill();  // opened mid-run, or a gap
        }
        const parts = [`step ${d.step}/${d.total}`];
        if (d.sec_per_step > 0) parts.push(`${d.sec_per_step.toFixed(2)} s/step`);
        if (d.step < d.total && d.eta >= 0 && d.sec_per_step > 0) parts.push(`ETA ${duration(d.eta)}`);
        if (typeof d.loss === "number") parts.push(`loss ${d.loss.toFixed(4)}`);
        this.text.textContent = parts.join(" · ");
        if (d.image) this.showImage(d.image);
        this.draw();
    }

    showImage(ref) {
        const first = !this.image.src;
        this.image.src = viewUrl(ref) + `&t=${Date.now()}`;  // the same name may be rewritten (a resumed run)
        this.image.style.display = "";
        if (first) this.fit();
    }

    // The curve so far from the run's log.jsonl (nodes/routes.py), merged under the points already here.
    async backfill(finished = false) {
        if (this.loading || !this.run) return;
        this.loading = true;
        try {
            const response = await api.fetchApi(`/personalize/run_log?${new URLSearchParams({ run: this.run })}`);
            if (!response.ok) return;
            const body = await response.json();
            const merged = new Map(body.points);
            for (const [step, loss] of this.points) merged.set(step, loss);
            this.points = [...merged].sort((a, b) => a[0] - b[0]);
            if (finished && body.points.length) {
                const [step] = body.points[body.points.length - 1];
                this.text.textContent = `finished: ${step}/${body.steps || step} steps`;
            }
            if (body.image && (finished || !this.image.src)) this.showImage(body.image);
            this.draw();
        } catch (e) {
            // an older server without the route: the live points alone
        } finally {
            this.loading = false;
        }
    }

    async listFiles() {
        this.list.replaceChildren(el("span", "", "..."));
        try {
            const response = await api.fetchApi(`/personalize/run_files?${new URLSearchParams({ run: this.run })}`);
            const body = await response.json();
            const links = (body.files ?? []).map((f) => {
                const a = el("a", "color:#8cf", `${f.name} (${(f.size / 1024).toFixed(0)} KB)`);
                a.href = viewUrl(f);
                a.target = "_blank";
                return a;
            });
            if (body.more) links.push(el("span", "", `and ${body.more} more`));
            this.list.replaceChildren(...(links.length ? links : [el("span", "", body.error ?? "no files yet")]));
        } catch (e) {
            this.list.replaceChildren(el("span", "", "could not list the files"));
        }
    }

    draw() {
        const c = this.canvas, ratio = window.devicePixelRatio || 1;
        c.width = Math.max(1, Math.round((c.clientWidth || 300) * ratio));
        c.height = Math.max(1, Math.round((c.clientHeight || 120) * ratio));
        const ctx = c.getContext("2d");
        ctx.fillStyle = BACKGROUND;
        ctx.fillRect(0, 0, c.width, c.height);
        const pts = this.points.filter(([, loss]) => Number.isFinite(loss));
        if (!pts.length) return;
        const pad = 6 * ratio, w = c.width - 2 * pad, h = c.height - 2 * pad;
        let lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
        if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
        const first = pts[0][0], span = Math.max(1, pts[pts.length - 1][0] - first);
        const x = (step) => pad + ((step - first) / span) * w;
        const y = (loss) => pad + (1 - (loss - lo) / (hi - lo)) * h;
        ctx.strokeStyle = GRID;
        ctx.lineWidth = ratio;
        ctx.beginPath();
        for (const f of [0, 0.5, 1]) { ctx.moveTo(pad, pad + f * h); ctx.lineTo(pad + w, pad + f * h); }
        ctx.stroke();
        const line = (values, color, width) => {
            ctx.strokeStyle = color;
            ctx.lineWidth = width * ratio;
            ctx.beginPath();
            values.forEach(([s, v], i) => (i ? ctx.lineTo(x(s), y(v)) : ctx.moveTo(x(s), y(v))));
            if (values.length === 1) ctx.lineTo(x(values[0][0]) + 2 * ratio, y(values[0][1]));
            ctx.stroke();
        };
        line(pts, LINE, 1.5);
        let ema = pts[0][1];  // smoothed, as the loss_curve output draws it
        line(pts.map(([s, v]) => [s, (ema = 0.9 * ema + 0.1 * v)]), SMOOTH, 1);
        ctx.fillStyle = "#aaa";
        ctx.font = `${10 * ratio}px sans-serif`;
        ctx.fillText(hi.toPrecision(3), pad + 2, pad + 10 * ratio);
        ctx.fillText(lo.toPrecision(3), pad + 2, pad + h - 2);
    }
}

function livePanel(node) {
    return (node.personalizeLive ??= new LivePanel(node));
}

// Compare Models' scores as a table on the node.
function showTable(node, table) {
    const root = el("div", "font:12px sans-serif;color:#ddd;overflow:auto;width:100%;height:100%");
    const grid = el("table", "border-collapse:collapse;width:100%");
    grid.className = "personalize-compare-table";
    const row = (cells, tag) => {
        const tr = el("tr");
        cells.forEach((cell, i) => tr.append(el(tag, "border:1px solid #555;padding:2px 6px;" +
            (i ? "text-align:right" : "text-align:left"), String(cell))));
        return tr;
    };
    grid.append(row(table.header, "th"), ...table.rows.map((cells) => row(cells, "td")));
    root.append(grid);
    if (table.note) root.append(el("div", "margin-top:4px;color:#aaa;white-space:normal", table.note));
    const height = () => 26 + 22 * (table.rows.length + 1) + (table.note ? 40 : 0);
    const old = node.widgets?.find((w) => w.name === "personalize_table");
    if (old) {
        old.element.replaceChildren(...root.childNodes);
        old.options.getMinHeight = old.options.getMaxHeight = height;
    } else {
        domWidget(node, "personalize_table", root, height);
    }
    const [w, h] = node.computeSize();
    node.setSize([Math.max(node.size[0], w, 420), Math.max(node.size[1], h)]);
    node.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "Personalize.LiveTraining",
    setup() {
        api.addEventListener("personalize.train", ({ detail }) => {
            const node = detail?.node != null && nodeByExecutionId(detail.node);
            // A prompt queued without a client id is broadcast: only a Personalize node of that id takes it.
            if (String(node?.comfyClass ?? node?.type ?? "").startsWith("Personalize")) livePanel(node).update(detail);
        });
        api.addEventListener("reconnected", () => {  // steps sent while the socket was down: read the log
            for (const node of app.graph?.nodes ?? []) node.personalizeLive?.backfill();
        });
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData.name.startsWith("Personalize")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            if (message?.table?.[0]) showTable(this, message.table[0]);
            const run = message?.run?.[0];
            if (run) {  // a trainer finished: its whole curve, last image and files, even if no step was seen
                const panel = livePanel(this);
                panel.setRun(run);
                panel.backfill(true);
            }
        };
    },
});
