/*
 * tlserve console: lists backbones and heads, trains a head from a labelled
 * file or an image folder with its curves drawn live, shows the confusion
 * matrix of held-out examples and tries a head on a text or an image.
 *
 * The messages are encoded with protobuf.js from the same .proto files the
 * server is built from (served under proto/), and sent with the gRPC-Web
 * client of grpc-web.js.
 */
(() => {
  "use strict";

  const { GrpcError, Code } = window.GrpcWeb;
  const Examples = window.Examples;

  /** The .proto files of the services the console calls (imports follow). */
  const PROTO_FILES = ["tlserve/v1/models.proto", "tlserve/v1/trainer.proto", "tlserve/v1/predictor.proto"];
  const PROTO_BASE = new URL("proto/", window.location.href);
  const TOKEN_KEY = "tlserve-console-token";
  const MiB = 1024 * 1024;

  /**
   * The server's request limits at their defaults (src/config.rs). A server
   * configured otherwise refuses with RESOURCE_EXHAUSTED, which is shown.
   */
  const LIMITS = {
    maxMessageBytes: 16 * MiB, // limits.max_message_bytes
    maxImageBytes: 10 * MiB, // limits.max_image_bytes
    maxTextChars: 100000, // limits.max_text_chars
    maxInputsPerRequest: 512, // limits.max_inputs_per_request
    maxExamplesPerJob: 100000, // heads.max_examples_per_job
    maxLabels: 1000, // heads.max_labels
    maxLabelChars: 128, // heads.max_label_chars
  };
  /** Predict requests of the held-out examples: inputs and bytes per request. */
  const EVALUATE_BATCH = 64;
  const EVALUATE_BATCH_BYTES = 4 * MiB;

  const $ = (id) => document.getElementById(id);

  const state = {
    root: null,
    backbones: new Map(),
    heads: [],
    data: null, // {kind: "text"|"image", source, examples: [{label, text}|{label, file, path}]}
    job: null, // {id, abort, history: Map(epoch -> metrics), ...}
    predictImage: null, // {name, bytes, url}
  };

  // ---------------------------------------------------------------- helpers

  function element(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "className") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svgElement(tag, attributes = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function formatBytes(bytes) {
    if (bytes >= MiB) return `${(bytes / MiB).toFixed(1)} MiB`;
    if (bytes >= 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${bytes} bytes`;
  }

  const percent = (value) => `${(100 * value).toFixed(1)}%`;
  const fixed = (value, digits = 4) =>
    value === undefined || value === null || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);

  function timestampText(timestamp) {
    if (!timestamp || (!timestamp.seconds && !timestamp.nanos)) return "";
    return new Date(Number(timestamp.seconds) * 1000 + Math.floor((timestamp.nanos || 0) / 1e6)).toLocaleString();
  }

  /** Shows an error (a GrpcError as "CODE: message", with a hint) in `id`; null hides it. */
  function showError(id, error) {
    const node = $(id);
    node.replaceChildren();
    if (!error) {
      node.hidden = true;
      delete node.dataset.code;
      return;
    }
    if (error instanceof GrpcError) {
      node.dataset.code = error.codeName;
      node.append(element("span", { className: "code" }, error.codeName), `: ${error.message || "(no message)"}`);
      const hint = hintFor(error);
      if (hint) node.append(`\n${hint}`);
    } else {
      node.dataset.code = "";
      node.append(String(error && error.message ? error.message : error));
    }
    node.hidden = false;
  }

  function hintFor(error) {
    switch (error.code) {
      case Code.UNAUTHENTICATED:
        return "This server wants a token: paste one at the top of the page.";
      case Code.PERMISSION_DENIED:
        return "The token's role does not allow this call.";
      case Code.UNAVAILABLE:
        return "The server is unreachable, loading, or shutting down; try again shortly.";
      case Code.RESOURCE_EXHAUSTED:
        return "A server limit was hit (message size, examples, or a full queue).";
      case Code.UNIMPLEMENTED:
        return "This server does not answer this call over gRPC-Web.";
      default:
        return "";
    }
  }

  // ------------------------------------------------------------------ token

  function storedToken() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (_) {
      return "";
    }
  }

  function showTokenState() {
    $("token-state").textContent = storedToken()
      ? "A token is set for this tab."
      : "No token: calls go without one.";
  }

  function setupToken() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      $("token").value = "";
      if (token && !/^[\x21-\x7e]+$/.test(token)) {
        $("token-state").textContent = "A token is printable ASCII without spaces; not set.";
        return;
      }
      try {
        if (token) window.sessionStorage.setItem(TOKEN_KEY, token);
        else window.sessionStorage.removeItem(TOKEN_KEY);
      } catch (_) {
        $("token-state").textContent = "This browser keeps no session storage; the token is not set.";
        return;
      }
      showTokenState();
      refreshAll();
    });
    $("token-forget").addEventListener("click", () => {
      try {
        window.sessionStorage.removeItem(TOKEN_KEY);
      } catch (_) {
        /* nothing stored */
      }
      $("token").value = "";
      showTokenState();
    });
    showTokenState();
  }

  // -------------------------------------------------------------------- API

  function loadProtos() {
    return new Promise((resolve, reject) => {
      const root = new protobuf.Root();
      // Imports are relative to the proto/ root, as for protoc -I proto.
      root.resolvePath = (_origin, target) => new URL(target, PROTO_BASE).toString();
      root.fetch = (url, callback) => {
        fetch(url, { cache: "no-cache" })
          .then((response) =>
            response.ok
              ? response.text().then((text) => callback(null, text))
              : callback(new Error(`GET ${new URL(url).pathname}: HTTP ${response.status}`)),
          )
          .catch((err) => callback(new Error(`GET ${url}: ${err.message}`)));
      };
      root.load(PROTO_FILES, { keepCase: false }, (err) => {
        if (err) {
          reject(err);
          return;
        }
        try {
          root.resolveAll();
          resolve(root);
        } catch (resolveErr) {
          reject(resolveErr);
        }
      });
    });
  }

  function method(service, name) {
    const found = state.root.lookupService(`tlserve.v1.${service}`).methods[name];
    found.resolve();
    return found;
  }

  function authHeaders() {
    const token = storedToken();
    return token ? { authorization: `Bearer ${token}` } : {};
  }

  const OBJECT_OPTIONS = { longs: Number, enums: String, defaults: true, arrays: true };

  function encodeRequest(found, request) {
    const type = found.resolvedRequestType;
    return type.encode(type.fromObject(request)).finish();
  }

  /** A unary call: the response as a plain object. */
  async function unary(service, name, request, bytes) {
    const found = method(service, name);
    const body = bytes || encodeRequest(found, request);
    const answer = await GrpcWeb.unary(`/tlserve.v1.${service}/${name}`, body, {
      headers: authHeaders(),
      baseUrl: window.location.origin + "/",
    });
    const type = found.resolvedResponseType;
    return type.toObject(type.decode(answer), OBJECT_OPTIONS);
  }

  /** A server-streaming call: onMessage(object) for each response. */
  async function serverStream(service, name, bytes, onMessage, signal) {
    const found = method(service, name);
    const type = found.resolvedResponseType;
    await GrpcWeb.call(
      `/tlserve.v1.${service}/${name}`,
      bytes,
      (payload) => onMessage(type.toObject(type.decode(payload), OBJECT_OPTIONS)),
      { headers: authHeaders(), signal, baseUrl: window.location.origin + "/" },
    );
  }

  // -------------------------------------------------------------- backbones

  const MODALITY_TEXT = { MODALITY_TEXT: "text", MODALITY_IMAGE: "image" };
  const BACKBONE_STATE_TEXT = {
    BACKBONE_STATE_READY: "ready",
    BACKBONE_STATE_LOADING: "loading",
    BACKBONE_STATE_FAILED: "failed",
  };

  /** Column headings of the listings; a visually hidden one names a column of buttons. */
  const BACKBONE_COLUMNS = ["Name", "Architecture", "Input", "Dimension", "Device", "Type", "State"];
  const HEAD_COLUMNS = ["Head", "Backbone", "Labels", "Examples", "Validation accuracy", "Published", { hidden: "Actions" }];

  /** Builds the table of a listing in `${name}-list`: caption, headings, a placeholder row. */
  function listingTable(name, caption, columns) {
    const headings = columns.map((column) =>
      typeof column === "string"
        ? element("th", { scope: "col" }, column)
        : element("th", { scope: "col" }, element("span", { className: "visually-hidden" }, column.hidden)),
    );
    $(`${name}-list`).append(
      element(
        "table",
        { id: `${name}-table` },
        element("caption", { className: "visually-hidden" }, caption),
        element("thead", {}, element("tr", {}, headings)),
        element("tbody", { id: `${name}-body` }, emptyRow(columns, "Not loaded yet.")),
      ),
    );
  }

  /** The placeholder row of an empty listing. */
  function emptyRow(columns, text) {
    return element("tr", { className: "empty" }, element("td", { colspan: columns.length }, text));
  }

  let backbonePoll = null;

  /**
   * Fills the listing section `name` (backbones or heads) from `call`; an
   * error shows in its error line.
   */
  async function loadListing(name, call, render) {
    const section = $(name);
    section.setAttribute("aria-busy", "true");
    try {
      render(await call());
      showError(`${name}-error`, null);
      section.dataset.loaded = "true";
    } catch (err) {
      showError(`${name}-error`, err);
      section.dataset.loaded = "error";
      const placeholder = $(`${name}-body`).querySelector("tr.empty td");
      if (placeholder) placeholder.textContent = "Not loaded: see the error above.";
    } finally {
      section.removeAttribute("aria-busy");
    }
  }

  function refreshBackbones() {
    return loadListing("backbones", () => unary("Models", "ListBackbones", {}), (response) => {
      state.backbones = new Map(response.backbones.map((b) => [b.name, b]));
      renderBackbones(response.backbones);
      // Poll while a backbone is still loading.
      clearTimeout(backbonePoll);
      if (response.backbones.some((b) => b.state === "BACKBONE_STATE_LOADING")) {
        backbonePoll = setTimeout(refreshBackbones, 2000);
      }
    });
  }

  function renderBackbones(backbones) {
    const body = $("backbones-body");
    body.replaceChildren();
    if (backbones.length === 0) {
      body.append(emptyRow(BACKBONE_COLUMNS, "No backbones configured."));
    }
    for (const b of backbones) {
      const stateName = BACKBONE_STATE_TEXT[b.state] || "unknown";
      const stateCell = element("td", { className: `state state-${stateName}` }, stateName);
      if (b.state === "BACKBONE_STATE_FAILED" && b.error) stateCell.title = b.error;
      body.append(
        element(
          "tr",
          { dataset: { backbone: b.name, state: stateName } },
          element("th", { scope: "row" }, b.name),
          element("td", {}, b.architecture),
          element("td", {}, MODALITY_TEXT[b.modality] || "?"),
          element("td", { className: "number" }, b.dimension),
          element("td", {}, b.device),
          element("td", {}, b.dtype),
          stateCell,
        ),
      );
    }
    // The training form's choice of backbone.
    const select = $("train-backbone");
    const previous = select.value;
    select.replaceChildren();
    for (const b of backbones) {
      const ready = b.state === "BACKBONE_STATE_READY";
      const label = `${b.name} (${MODALITY_TEXT[b.modality] || "?"}${ready ? "" : `, ${BACKBONE_STATE_TEXT[b.state] || "not ready"}`})`;
      select.append(element("option", { value: b.name, disabled: !ready }, label));
    }
    if ([...select.options].some((o) => o.value === previous && !o.disabled)) select.value = previous;
    else {
      const first = [...select.options].find((o) => !o.disabled);
      if (first) select.value = first.value;
    }
    renderPredictHeads();
  }

  // ------------------------------------------------------------------ heads

  function refreshHeads() {
    const request = { allVersions: $("heads-all-versions").checked };
    return loadListing("heads", () => unary("Models", "ListHeads", request), (response) => {
      state.heads = response.heads;
      renderHeads();
    });
  }

  function renderHeads() {
    const body = $("heads-body");
    body.replaceChildren();
    if (state.heads.length === 0) {
      body.append(emptyRow(HEAD_COLUMNS, "No heads yet: train one below."));
    }
    for (const head of state.heads) {
      const metrics = head.metrics || {};
      const tryButton = element("button", { type: "button", className: "small", "aria-label": `Try ${head.name}` }, "Try");
      tryButton.addEventListener("click", () => {
        $("predict-head").value = head.name;
        updatePredictHint();
        $("predict").scrollIntoView({ block: "start" });
        $("predict-text").focus({ preventScroll: true });
      });
      const row = element(
        "tr",
        { dataset: { head: head.name, version: head.version } },
        element("th", { scope: "row" }, `${head.name}@${head.version}`),
        element("td", {}, head.backbone),
        element("td", {}, head.labels.join(", ")),
        element("td", { className: "number" }, head.trainExamples),
        element(
          "td",
          { className: "number" },
          metrics.validationAccuracy === undefined ? "–" : percent(metrics.validationAccuracy),
        ),
        element("td", {}, timestampText(head.createdAt)),
        element("td", {}, tryButton),
      );
      body.append(row);
    }
    renderPredictHeads();
  }

  function refreshAll() {
    return Promise.all([refreshBackbones(), refreshHeads()]);
  }

  // --------------------------------------------------------- training data

  function setData(data) {
    state.data = data;
    const summary = $("train-data-summary");
    if (!data) {
      summary.textContent = "No examples chosen.";
      delete summary.dataset.examples;
      return;
    }
    const counts = Examples.labelCounts(data.examples);
    const share = holdoutShare();
    const held = [...counts.values()].reduce((sum, n) => sum + Examples.heldOutCount(n, share), 0);
    const perLabel = [...counts.entries()].map(([label, n]) => `${label} ${n}`).join(", ");
    const what = data.kind === "image" ? "images" : "examples";
    let text = `${data.examples.length} ${what} in ${counts.size} labels from ${data.source}: ${perLabel}.`;
    text += share > 0 ? ` ${data.examples.length - held} train the head; ${held} are held out for the confusion matrix.` : "";
    if (data.note) text += ` ${data.note}`;
    summary.textContent = text;
    summary.dataset.examples = String(data.examples.length);
    summary.dataset.labels = String(counts.size);
  }

  /** Checks the examples against the server's default limits; returns a problem or "". */
  function checkExamples(examples, kind) {
    if (examples.length > LIMITS.maxExamplesPerJob) {
      return `${examples.length} examples: a job takes at most ${LIMITS.maxExamplesPerJob} (heads.max_examples_per_job).`;
    }
    const labels = new Set();
    for (const example of examples) {
      const where = example.line ? `line ${example.line}` : example.path;
      if (!example.label) return `${where}: the label is empty.`;
      if ([...example.label].length > LIMITS.maxLabelChars) {
        return `${where}: the label is longer than ${LIMITS.maxLabelChars} characters (heads.max_label_chars).`;
      }
      labels.add(example.label);
      if (kind === "text") {
        if (!example.text.trim()) return `${where}: the text is empty.`;
        if ([...example.text].length > LIMITS.maxTextChars) {
          return `${where}: the text is longer than ${LIMITS.maxTextChars} characters (limits.max_text_chars).`;
        }
      } else if (example.file.size > LIMITS.maxImageBytes) {
        return `${where} is ${formatBytes(example.file.size)}; the server takes images of at most ${formatBytes(LIMITS.maxImageBytes)} (limits.max_image_bytes).`;
      }
    }
    if (labels.size > LIMITS.maxLabels) return `${labels.size} labels: a head has at most ${LIMITS.maxLabels}.`;
    return "";
  }

  /** Over this, the examples cannot fit one TrainHead message (gRPC-Web cannot upload in chunks). */
  function tooLargeMessage(bytes) {
    return (
      `The examples come to ${formatBytes(bytes)}, but one request may carry at most ` +
      `${formatBytes(LIMITS.maxMessageBytes)} (the server's limits.max_message_bytes). ` +
      "The console sends the examples inline in TrainHead, since a browser cannot stream an upload " +
      "over gRPC-Web; use fewer or smaller files here, or `tlserve train`, which uploads large sets in chunks."
    );
  }

  async function readTextFile(file) {
    showError("train-data-error", null);
    $("train-folder").value = "";
    setData(null);
    if (file.size > LIMITS.maxMessageBytes) {
      showError("train-data-error", `${file.name}: ${tooLargeMessage(file.size)}`);
      return;
    }
    try {
      const examples = Examples.parseTextFile(file.name, await file.text());
      const problem = checkExamples(examples, "text");
      if (problem) throw new Examples.DataError(`${file.name} ${problem}`);
      setData({ kind: "text", source: file.name, examples });
    } catch (err) {
      showError("train-data-error", err);
    }
  }

  function readImageFolder(files) {
    showError("train-data-error", null);
    $("train-file").value = "";
    setData(null);
    if (!files.length) return;
    const { images, skipped } = Examples.groupImageFolder(files);
    const root = (files[0].webkitRelativePath || "").split("/")[0] || "the folder";
    if (images.length === 0) {
      showError(
        "train-data-error",
        `${root} holds no PNG, JPEG or WebP files in subfolders; put each label's images in a subfolder named as the label.`,
      );
      return;
    }
    const problem = checkExamples(images, "image");
    if (problem) {
      showError("train-data-error", problem);
      return;
    }
    const total = images.reduce((sum, image) => sum + image.file.size, 0);
    if (total > LIMITS.maxMessageBytes) {
      showError("train-data-error", tooLargeMessage(total));
      return;
    }
    const note = skipped.length ? `${skipped.length} other files were skipped (not PNG, JPEG or WebP, or not in a label's subfolder).` : "";
    setData({ kind: "image", source: root, examples: images, note });
  }

  function holdoutShare() {
    const share = Number($("train-holdout").value);
    return Number.isFinite(share) && share > 0 && share < 1 ? share : 0;
  }

  // -------------------------------------------------------------- training

  const JOB_STATE_TEXT = {
    JOB_STATE_QUEUED: "Queued",
    JOB_STATE_EMBEDDING: "Embedding the examples",
    JOB_STATE_TRAINING: "Training",
    JOB_STATE_SUCCEEDED: "Succeeded",
    JOB_STATE_FAILED: "Failed",
    JOB_STATE_CANCELLED: "Cancelled",
  };
  const FINAL_STATES = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);

  function setTrainStatus(text, stateName) {
    const node = $("train-status");
    node.textContent = text;
    node.dataset.state = stateName;
  }

  async function inputOf(example) {
    if (example.text !== undefined) return { text: example.text };
    return { image: new Uint8Array(await example.file.arrayBuffer()) };
  }

  async function startTraining(event) {
    event.preventDefault();
    showError("train-error", null);
    const backbone = state.backbones.get($("train-backbone").value);
    const headName = $("train-head-name").value.trim();
    const data = state.data;
    const fail = (message) => {
      showError("train-error", message);
      setTrainStatus("Not started.", "error");
    };
    if (!backbone) return fail("Choose a backbone that is ready.");
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(headName)) {
      return fail("Name the head with 1 to 64 letters, digits, '-', '_' or '.'.");
    }
    if (!data) return fail("Choose a file of labelled texts or a folder of images first.");
    const modality = MODALITY_TEXT[backbone.modality];
    if (modality !== data.kind) {
      return fail(`${backbone.name} takes ${modality} inputs, but the examples are ${data.kind === "image" ? "images" : "texts"}.`);
    }
    const labels = Examples.labelCounts(data.examples);
    if (labels.size < 2) return fail("The examples need at least two different labels.");

    const seed = Math.max(0, Math.floor(Number($("train-seed").value) || 0));
    const share = holdoutShare();
    const split = Examples.stratifiedSplit(data.examples, share, seed);
    const training = { seed };
    if ($("train-solver").value === "adamw") {
      const epochs = Math.floor(Number($("train-epochs").value));
      if (!(epochs >= 1 && epochs <= 1000)) return fail("Epochs must be a whole number from 1 to 1000.");
      training.solver = "SOLVER_ADAMW";
      training.epochs = epochs;
      const learningRate = $("train-learning-rate").value.trim();
      if (learningRate) {
        const value = Number(learningRate);
        if (!(value > 0 && value <= 10)) return fail("The learning rate must be a number above 0 (at most 10).");
        training.learningRate = value;
      }
      const batchSize = $("train-batch-size").value.trim();
      if (batchSize) {
        const value = Number(batchSize);
        if (!(Number.isInteger(value) && value >= 1)) return fail("The batch size must be a whole number from 1.");
        training.batchSize = value;
      }
    }
    const spec = $("train-kind").value === "mlp" ? { mlp: { dropout: 0.1 } } : { linear: {} };

    setTrainStatus("Preparing the examples…", "preparing");
    let bytes;
    try {
      const examples = [];
      for (const example of split.train) examples.push({ input: await inputOf(example), label: example.label });
      const found = method("Trainer", "TrainHead");
      bytes = encodeRequest(found, {
        backbone: backbone.name,
        headName,
        spec,
        training,
        examples: { examples },
      });
    } catch (err) {
      return fail(`Cannot read the examples: ${err.message}`);
    }
    if (bytes.length > LIMITS.maxMessageBytes) return fail(tooLargeMessage(bytes.length));

    resetRun();
    const controller = new AbortController();
    const job = {
      id: "",
      controller,
      history: new Map(),
      holdout: split.holdout,
      trainCount: split.train.length,
      finalEvent: null,
      totalEpochs: 0,
    };
    state.job = job;
    $("train-start").disabled = true;
    $("train-cancel").disabled = false;
    setTrainStatus(`Sending ${split.train.length} examples (${formatBytes(bytes.length)})…`, "sending");

    try {
      await serverStream("Trainer", "TrainHead", bytes, (trainEvent) => onTrainEvent(job, trainEvent), controller.signal);
      if (!job.finalEvent) {
        throw new GrpcError(
          Code.UNAVAILABLE,
          `the event stream ended before the job finished${job.id ? ` (job ${job.id} may still run)` : ""}`,
        );
      }
    } catch (err) {
      showError("train-error", err);
      if (!job.finalEvent) setTrainStatus(`Stopped: ${err.codeName || "error"}`, "error");
    } finally {
      $("train-start").disabled = false;
      $("train-cancel").disabled = true;
    }
    if (job.finalEvent && job.finalEvent.state === "JOB_STATE_SUCCEEDED") {
      await finishJob(job, job.finalEvent);
    }
  }

  function resetRun() {
    $("train-epochs-body").replaceChildren();
    $("train-result").hidden = true;
    $("train-result").textContent = "";
    $("confusion").hidden = true;
    $("confusion-matrix").hidden = true;
    $("confusion-matrix").replaceChildren();
    showError("confusion-error", null);
    $("train-progress").hidden = true;
    drawCharts(new Map(), 0);
  }

  function onTrainEvent(job, trainEvent) {
    if (trainEvent.jobId) job.id = trainEvent.jobId;
    const stateName = trainEvent.state;
    const stateText = JOB_STATE_TEXT[stateName] || stateName;
    const progress = $("train-progress");
    switch (stateName) {
      case "JOB_STATE_EMBEDDING": {
        const total = trainEvent.totalInputs || 0;
        progress.hidden = total === 0;
        progress.max = Math.max(1, total);
        progress.value = trainEvent.embedded || 0;
        setTrainStatus(`${stateText}: ${trainEvent.embedded} of ${total} (job ${job.id})`, stateName);
        break;
      }
      case "JOB_STATE_TRAINING": {
        progress.hidden = true;
        job.totalEpochs = Math.max(job.totalEpochs, trainEvent.totalEpochs || 0);
        if (trainEvent.epoch > 0 && trainEvent.metrics) {
          job.history.set(trainEvent.epoch, trainEvent.metrics);
          renderEpochRow(trainEvent.epoch, trainEvent.metrics);
          drawCharts(job.history, job.totalEpochs);
        }
        setTrainStatus(`${stateText}: epoch ${trainEvent.epoch} of ${job.totalEpochs} (job ${job.id})`, stateName);
        break;
      }
      case "JOB_STATE_SUCCEEDED": {
        job.finalEvent = trainEvent;
        progress.hidden = true;
        const head = trainEvent.head;
        setTrainStatus(
          `${stateText}: published ${head ? `${head.name}@${head.version}` : "the head"} (job ${job.id})`,
          stateName,
        );
        break;
      }
      case "JOB_STATE_FAILED":
      case "JOB_STATE_CANCELLED":
        job.finalEvent = trainEvent;
        progress.hidden = true;
        setTrainStatus(`${stateText} (job ${job.id})`, stateName);
        showError("train-error", trainEvent.error || stateText);
        break;
      default:
        setTrainStatus(`${stateText} (job ${job.id})`, stateName);
    }
  }

  function renderEpochRow(epoch, metrics) {
    const body = $("train-epochs-body");
    const existing = body.querySelector(`tr[data-epoch="${epoch}"]`);
    const row = element(
      "tr",
      { dataset: { epoch } },
      element("th", { scope: "row", className: "number" }, epoch),
      element("td", { className: "number" }, fixed(metrics.trainLoss)),
      element("td", { className: "number" }, percent(metrics.trainAccuracy || 0)),
      element("td", { className: "number" }, fixed(metrics.validationLoss)),
      element("td", { className: "number" }, metrics.validationAccuracy === undefined ? "–" : percent(metrics.validationAccuracy)),
    );
    if (existing) existing.replaceWith(row);
    else body.append(row);
  }

  async function cancelJob() {
    const job = state.job;
    if (!job) return;
    $("train-cancel").disabled = true;
    if (!job.id) {
      job.controller.abort();
      return;
    }
    try {
      await unary("Trainer", "CancelJob", { jobId: job.id });
      setTrainStatus(`Cancelling job ${job.id}…`, "cancelling");
    } catch (err) {
      showError("train-error", err);
    }
  }

  async function finishJob(job, finalEvent) {
    const head = finalEvent.head;
    const metrics = (head && head.metrics) || finalEvent.metrics || {};
    const result = $("train-result");
    const parts = [];
    if (head) parts.push(`Published ${head.name}@${head.version} on ${head.backbone}, labels ${head.labels.join(", ")}.`);
    parts.push(`Training accuracy ${percent(metrics.trainAccuracy || 0)}, loss ${fixed(metrics.trainLoss)}.`);
    if (metrics.validationAccuracy !== undefined) {
      parts.push(
        `Server-side validation (${head ? head.validationExamples : "?"} examples): accuracy ${percent(metrics.validationAccuracy)}, loss ${fixed(metrics.validationLoss)}.`,
      );
    }
    result.textContent = parts.join(" ");
    result.hidden = false;
    refreshHeads().then(() => {
      if (head) {
        $("predict-head").value = head.name;
        updatePredictHint();
      }
    });
    if (head) await evaluateHoldout(job, head);
  }

  // -------------------------------------------------------------- confusion

  async function evaluateHoldout(job, head) {
    const section = $("confusion");
    const status = $("confusion-status");
    section.hidden = false;
    section.dataset.state = "running";
    if (job.holdout.length === 0) {
      status.textContent = "No examples were held out (set a held-out share above 0 to see a confusion matrix).";
      section.dataset.state = "none";
      return;
    }
    status.textContent = `Predicting the ${job.holdout.length} held-out examples with ${head.name}@${head.version}…`;
    try {
      const predicted = [];
      let batch = [];
      let batchBytes = 0;
      const flush = async () => {
        if (batch.length === 0) return;
        const response = await unary("Predictor", "Predict", {
          head: `${head.name}@${head.version}`,
          inputs: batch,
          topK: 1,
          priority: "PRIORITY_BULK",
        });
        for (const prediction of response.predictions) predicted.push(prediction.labels[0] ? prediction.labels[0].label : "");
        batch = [];
        batchBytes = 0;
      };
      for (const example of job.holdout) {
        const input = await inputOf(example);
        const size = input.text !== undefined ? input.text.length * 3 : input.image.length;
        if (batch.length >= Math.min(EVALUATE_BATCH, LIMITS.maxInputsPerRequest) || batchBytes + size > EVALUATE_BATCH_BYTES) {
          await flush();
        }
        batch.push(input);
        batchBytes += size;
      }
      await flush();
      const matrix = Examples.confusionMatrix(head.labels, job.holdout.map((e) => e.label), predicted);
      renderConfusion(matrix);
      const right = Math.round(matrix.accuracy * matrix.total);
      status.textContent = `Accuracy on the ${matrix.total} held-out examples: ${percent(matrix.accuracy)} (${right} right).`;
      section.dataset.state = "done";
      section.dataset.accuracy = String(matrix.accuracy);
    } catch (err) {
      status.textContent = "The held-out examples could not be predicted.";
      showError("confusion-error", err);
      section.dataset.state = "error";
    }
  }

  function renderConfusion(matrix) {
    const table = $("confusion-matrix");
    table.replaceChildren();
    table.append(
      element("caption", { className: "visually-hidden" }, "Held-out examples by true label (rows) and predicted label (columns)"),
    );
    const headRow = element("tr", {}, element("th", { scope: "col", className: "corner" }, "true \u2193 / predicted \u2192"));
    for (const label of matrix.labels) headRow.append(element("th", { scope: "col" }, label));
    table.append(element("thead", {}, headRow));
    const body = element("tbody");
    matrix.labels.forEach((trueLabel, row) => {
      const rowTotal = matrix.counts[row].reduce((a, b) => a + b, 0);
      const tr = element("tr", {}, element("th", { scope: "row" }, trueLabel));
      matrix.labels.forEach((predictedLabel, column) => {
        const count = matrix.counts[row][column];
        const cell = element(
          "td",
          {
            className: row === column ? "diagonal" : null,
            dataset: { true: trueLabel, predicted: predictedLabel, count },
          },
          count,
        );
        const share = rowTotal ? count / rowTotal : 0;
        cell.style.backgroundColor = row === column
          ? `rgba(23, 102, 58, ${0.08 + 0.35 * share})`
          : `rgba(194, 65, 12, ${count ? 0.08 + 0.35 * share : 0})`;
        tr.append(cell);
      });
      body.append(tr);
    });
    table.append(body);
    table.hidden = false;
  }

  // ----------------------------------------------------------------- charts

  const CHART = { width: 480, height: 260, left: 52, right: 16, top: 16, bottom: 40 };

  /** Tick values from 0 to max at a round step. */
  function ticks(max, count) {
    const raw = max / count;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
    const values = [];
    for (let v = 0; v <= max + step * 1e-9; v += step) values.push(Number(v.toPrecision(12)));
    return values;
  }

  function drawChart(svg, series, xMax, yMax, yFormat, unit) {
    const title = svg.querySelector("title");
    const desc = svg.querySelector("desc");
    svg.replaceChildren(title, desc);
    const { width, height, left, right, top, bottom } = CHART;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const x = (epoch) => left + (xMax <= 1 ? plotW / 2 : ((epoch - 1) / (xMax - 1)) * plotW);
    const y = (value) => top + plotH - (Math.min(value, yMax) / yMax) * plotH;

    for (const value of ticks(yMax, 4)) {
      svg.append(svgElement("line", { class: "grid-line", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
      svg.append(svgElement("text", { class: "tick", x: left - 6, y: y(value) + 4, "text-anchor": "end" }, yFormat(value)));
    }
    const xTicks = xMax <= 1 ? [1] : ticks(xMax - 1, Math.min(6, xMax - 1)).map((v) => v + 1).filter((v) => Number.isInteger(v));
    for (const epoch of xTicks) {
      svg.append(svgElement("text", { class: "tick", x: x(epoch), y: height - bottom + 16, "text-anchor": "middle" }, epoch));
    }
    svg.append(svgElement("line", { class: "axis", x1: left, x2: width - right, y1: top + plotH, y2: top + plotH }));
    svg.append(svgElement("line", { class: "axis", x1: left, x2: left, y1: top, y2: top + plotH }));
    svg.append(svgElement("text", { class: "axis-label", x: left + plotW / 2, y: height - 6, "text-anchor": "middle" }, "epoch"));
    svg.append(
      svgElement("text", { class: "axis-label", x: 12, y: top + plotH / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${top + plotH / 2})` }, unit),
    );

    let epochs = 0;
    for (const s of series) {
      const points = s.points.filter((p) => Number.isFinite(p.value));
      epochs = Math.max(epochs, points.length);
      const polyline = svgElement("polyline", {
        id: s.id,
        class: `curve ${s.className}`,
        points: points.map((p) => `${x(p.epoch).toFixed(1)},${y(p.value).toFixed(1)}`).join(" "),
        "data-points": points.length,
      });
      svg.append(polyline);
      for (const p of points) {
        const dot = svgElement("circle", { class: `point ${s.className}`, cx: x(p.epoch), cy: y(p.value), r: 3, "data-epoch": p.epoch });
        dot.append(svgElement("title", {}, `${s.label}, epoch ${p.epoch}: ${yFormat(p.value)}`));
        svg.append(dot);
      }
    }
    if (epochs === 0) {
      svg.append(svgElement("text", { class: "empty-note", x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle" }, "No epochs yet"));
    }
    return epochs;
  }

  /** The two charts: which metrics they plot and how their values read. */
  const CHARTS = [
    { what: "loss", train: "trainLoss", validation: "validationLoss", caption: "Loss (mean cross-entropy) per epoch" },
    { what: "accuracy", train: "trainAccuracy", validation: "validationAccuracy", caption: "Accuracy per epoch" },
  ];

  /** The empty charts: an <svg id="train-chart-WHAT"> with a title and a description each. */
  function createCharts() {
    for (const chart of CHARTS) {
      const id = `train-chart-${chart.what}`;
      const svg = svgElement("svg", {
        id,
        viewBox: `0 0 ${CHART.width} ${CHART.height}`,
        role: "img",
        "aria-labelledby": `${id}-title ${id}-desc`,
        "data-epochs": 0,
      });
      svg.append(svgElement("title", { id: `${id}-title` }, chart.caption), svgElement("desc", { id: `${id}-desc` }, ""));
      $("train-charts").append(element("figure", { className: "chart" }, svg, element("figcaption", {}, chart.caption)));
    }
  }

  function drawCharts(history, totalEpochs) {
    const epochs = [...history.keys()].sort((a, b) => a - b);
    const lastEpoch = epochs.length ? epochs[epochs.length - 1] : 0;
    const last = lastEpoch ? history.get(lastEpoch) : null;
    const xMax = Math.max(totalEpochs, lastEpoch, 1);
    const pick = (name) => epochs.map((epoch) => ({ epoch, value: history.get(epoch)[name] }));
    const lossValues = epochs.flatMap((e) => [history.get(e).trainLoss, history.get(e).validationLoss]).filter(Number.isFinite);
    const lossMax = Math.max(0.1, ...lossValues) * 1.1;

    for (const chart of CHARTS) {
      const isLoss = chart.what === "loss";
      const format = isLoss ? (v) => v.toFixed(lossMax < 1 ? 2 : 1) : (v) => `${Math.round(v * 100)}%`;
      const svg = $(`train-chart-${chart.what}`);
      const series = ["train", "validation"].map((part) => ({
        id: `curve-${part}-${chart.what}`,
        className: part,
        label: `${part === "train" ? "Training" : "Validation"} ${chart.what}`,
        points: pick(chart[part]),
      }));
      svg.dataset.epochs = String(drawChart(svg, series, xMax, isLoss ? lossMax : 1, format, chart.what));
      const exact = isLoss ? (v) => fixed(v) : percent;
      const validation = last && last[chart.validation];
      svg.querySelector("desc").textContent = last
        ? `${epochs.length} epochs. Last, epoch ${lastEpoch}: training ${chart.what} ${exact(last[chart.train])}` +
          (Number.isFinite(validation) ? `, validation ${chart.what} ${exact(validation)}.` : ".")
        : "No epochs yet.";
    }
  }

  // ---------------------------------------------------------------- predict

  /** Heads to try: the stored ones and the classifiers that came with backbones. */
  function renderPredictHeads() {
    const select = $("predict-head");
    const previous = select.value;
    select.replaceChildren();
    const names = new Set();
    // The latest version of each name (the listing may hold every version).
    const latest = new Map();
    for (const head of state.heads) {
      if (!latest.has(head.name) || latest.get(head.name).version < head.version) latest.set(head.name, head);
    }
    if (latest.size) {
      const group = element("optgroup", { label: "Trained heads" });
      for (const head of latest.values()) {
        names.add(head.name);
        group.append(
          element("option", { value: head.name, dataset: { backbone: head.backbone } }, `${head.name} (latest: v${head.version}, ${head.backbone})`),
        );
      }
      select.append(group);
    }
    const builtins = [...state.backbones.values()].flatMap((b) => b.builtinHeads.map((h) => ({ name: h, backbone: b.name })));
    if (builtins.length) {
      const group = element("optgroup", { label: "Built-in classifiers" });
      for (const { name, backbone } of builtins) {
        names.add(name);
        group.append(element("option", { value: name, dataset: { backbone } }, name));
      }
      select.append(group);
    }
    if (names.size === 0) select.append(element("option", { value: "" }, "No heads yet"));
    if (names.has(previous)) select.value = previous;
    updatePredictHint();
  }

  function predictModality() {
    const option = $("predict-head").selectedOptions[0];
    const backbone = option && state.backbones.get(option.dataset.backbone);
    return backbone ? MODALITY_TEXT[backbone.modality] : "";
  }

  function updatePredictHint() {
    const modality = predictModality();
    $("predict-head-hint").textContent =
      modality === "image" ? "This head reads images: drop or choose one below." :
      modality === "text" ? "This head reads text: type some." : "";
  }

  function setPredictImage(file) {
    showError("predict-error", null);
    if (state.predictImage) URL.revokeObjectURL(state.predictImage.url);
    state.predictImage = null;
    const preview = $("predict-preview");
    preview.hidden = true;
    if (!file) return;
    if (file.size > LIMITS.maxImageBytes) {
      showError("predict-error", `${file.name} is ${formatBytes(file.size)}; the server takes images of at most ${formatBytes(LIMITS.maxImageBytes)} (limits.max_image_bytes).`);
      return;
    }
    const url = URL.createObjectURL(file);
    state.predictImage = { file, url };
    preview.src = url;
    preview.alt = `The image to predict: ${file.name}`;
    preview.hidden = false;
    runPredict();
  }

  async function runPredict(event) {
    if (event) event.preventDefault();
    showError("predict-error", null);
    const head = $("predict-head").value;
    const result = $("predict-result");
    if (!head) {
      showError("predict-error", "No head to try yet: train one first.");
      return;
    }
    const modality = predictModality();
    let input;
    if (modality === "image") {
      if (!state.predictImage) {
        showError("predict-error", `${head} reads images: drop or choose an image.`);
        return;
      }
      input = { image: new Uint8Array(await state.predictImage.file.arrayBuffer()) };
    } else {
      const text = $("predict-text").value;
      if (!text.trim()) {
        showError("predict-error", "Type a text to predict.");
        return;
      }
      if ([...text].length > LIMITS.maxTextChars) {
        showError("predict-error", `The text is longer than ${LIMITS.maxTextChars} characters (limits.max_text_chars).`);
        return;
      }
      input = { text };
    }
    $("predict-run").disabled = true;
    $("predict-status").textContent = `Asking ${head}…`;
    result.replaceChildren();
    delete result.dataset.head;
    try {
      const response = await unary("Predictor", "Predict", { head, inputs: [input], topK: 5 });
      const prediction = response.predictions[0] || { labels: [] };
      for (const score of prediction.labels) {
        result.append(
          element(
            "li",
            { dataset: { label: score.label, probability: score.probability } },
            element(
              "div",
              { className: "score-row" },
              element("span", { className: "label" }, score.label),
              element("meter", { min: 0, max: 1, value: score.probability, "aria-label": `${score.label} probability` }),
              element("span", { className: "probability" }, percent(score.probability)),
            ),
          ),
        );
      }
      result.dataset.head = `${response.head}@${response.version}`;
      $("predict-status").textContent = `${response.head}${response.version ? `@${response.version}` : ""} says: ${prediction.labels[0] ? prediction.labels[0].label : "nothing"}.`;
    } catch (err) {
      $("predict-status").textContent = "";
      showError("predict-error", err);
    } finally {
      $("predict-run").disabled = false;
    }
  }

  function setupPredict() {
    $("predict-form").addEventListener("submit", runPredict);
    $("predict-head").addEventListener("change", updatePredictHint);
    $("predict-text").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) runPredict(event);
    });
    $("predict-image").addEventListener("change", (event) => setPredictImage(event.target.files[0]));
    const drop = $("predict-drop");
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("dragging");
      const file = event.dataTransfer.files[0];
      if (file) setPredictImage(file);
    });
  }

  // ------------------------------------------------------------------ start

  function setupTraining() {
    $("train-form").addEventListener("submit", startTraining);
    $("train-cancel").addEventListener("click", cancelJob);
    $("train-file").addEventListener("change", (event) => {
      if (event.target.files[0]) readTextFile(event.target.files[0]);
    });
    $("train-folder").addEventListener("change", (event) => readImageFolder(event.target.files));
    $("train-holdout").addEventListener("change", () => setData(state.data));
    createCharts();
    $("train-solver").addEventListener("change", () => {
      const adamw = $("train-solver").value === "adamw";
      for (const id of ["train-epochs", "train-learning-rate", "train-batch-size"]) $(id).disabled = !adamw;
    });
    drawCharts(new Map(), 0);
  }

  async function start() {
    listingTable("backbones", "Configured backbones", BACKBONE_COLUMNS);
    listingTable("heads", "Stored heads", HEAD_COLUMNS);
    setupToken();
    setupTraining();
    setupPredict();
    $("refresh").addEventListener("click", refreshAll);
    $("heads-all-versions").addEventListener("change", refreshHeads);
    const banner = $("banner");
    try {
      state.root = await loadProtos();
    } catch (err) {
      $("app-status").textContent = `Cannot load the API definitions from ${PROTO_BASE.pathname}: ${err.message}`;
      banner.dataset.state = "error";
      document.body.dataset.ready = "error";
      return;
    }
    $("app-status").textContent = `Talking gRPC-Web to ${window.location.host}.`;
    banner.dataset.state = "ready";
    $("refresh").disabled = false;
    document.body.dataset.ready = "true";
    await refreshAll();
  }

  start();
})();
