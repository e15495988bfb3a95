/*
 * Labelled examples for the console: reading text files (CSV with text and
 * label columns, JSON Lines with "text" and "label" fields, LABEL<TAB>TEXT
 * lines), grouping image folders by subfolder, the stratified hold-out split
 * and the confusion matrix of a head's predictions.
 *
 * A classic script: it defines self.Examples.
 */
self.Examples = (() => {
  "use strict";

  /** A problem with the user's data, with where it is. */
  class DataError extends Error {
    constructor(message) {
      super(message);
      this.name = "DataError";
    }
  }

  /**
   * RFC 4180 CSV: quoted fields may hold commas, quotes ("" inside quotes)
   * and line breaks; a quote inside an unquoted field is kept as it is.
   * Returns rows of {cells, line} (line from 1).
   */
  function parseCsvRows(text) {
    const rows = [];
    let cells = [];
    let cell = "";
    let quoted = false;
    let afterQuote = false;
    let line = 1;
    let rowLine = 1;
    const endCell = () => {
      cells.push(cell);
      cell = "";
      afterQuote = false;
    };
    const endRow = () => {
      endCell();
      rows.push({ cells, line: rowLine });
      cells = [];
    };
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (quoted) {
        if (c === '"') {
          if (text[i + 1] === '"') {
            cell += '"';
            i++;
          } else {
            quoted = false;
            afterQuote = true;
          }
        } else {
          if (c === "\n") line++;
          cell += c;
        }
        continue;
      }
      if (c === '"' && cell.length === 0 && !afterQuote) {
        quoted = true;
      } else if (c === ",") {
        endCell();
      } else if (c === "\r" && text[i + 1] === "\n") {
        // The \n ends the row.
      } else if (c === "\n" || c === "\r") {
        endRow();
        line++;
        rowLine = line;
      } else {
        if (afterQuote) {
          throw new DataError(`line ${line}: text after a closing quote`);
        }
        cell += c;
      }
    }
    if (quoted) throw new DataError(`line ${rowLine}: a quoted field is never closed`);
    if (cell.length > 0 || cells.length > 0 || afterQuote) endRow();
    return rows.filter((row) => row.cells.some((c) => c.trim() !== ""));
  }

  /**
   * CSV examples. A first row naming `text` and `label` is a header and says
   * where they are; without one, the label is the first column and the text
   * the second (as LABEL<TAB>TEXT lines).
   */
  function parseCsv(text) {
    const rows = parseCsvRows(text);
    if (rows.length === 0) return [];
    const names = rows[0].cells.map((c) => c.trim().toLowerCase());
    const header = names.includes("text") && names.includes("label");
    const textAt = header ? names.indexOf("text") : 1;
    const labelAt = header ? names.indexOf("label") : 0;
    const examples = [];
    for (const row of rows.slice(header ? 1 : 0)) {
      if (row.cells.length <= Math.max(textAt, labelAt)) {
        throw new DataError(
          `line ${row.line}: ${row.cells.length} column(s); expected a text and a label` +
            (header ? "" : " (no header row naming the text and label columns, so label,text)"),
        );
      }
      examples.push({ text: row.cells[textAt], label: row.cells[labelAt].trim(), line: row.line });
    }
    return examples;
  }

  /** The lines of a text that hold more than white space, numbered from 1. */
  function nonBlankLines(text) {
    return text
      .split(/\r?\n/)
      .map((raw, index) => ({ raw, line: index + 1 }))
      .filter(({ raw }) => raw.trim() !== "");
  }

  /** One JSON object per non-blank line with a string `text` and a `label`. */
  function parseJsonl(text) {
    return nonBlankLines(text).map(({ raw, line }) => {
      let object;
      try {
        object = JSON.parse(raw);
      } catch (err) {
        throw new DataError(`line ${line}: not valid JSON (${err.message})`);
      }
      if (!object || typeof object !== "object" || Array.isArray(object)) {
        throw new DataError(`line ${line}: expected an object with "text" and "label"`);
      }
      if (typeof object.text !== "string") {
        throw new DataError(`line ${line}: no string field "text"`);
      }
      const label = object.label;
      if (!["string", "number", "boolean"].includes(typeof label)) {
        throw new DataError(`line ${line}: no string or number field "label"`);
      }
      return { text: object.text, label: String(label).trim(), line };
    });
  }

  /** LABEL<TAB>TEXT lines, blank lines skipped. */
  function parseTsv(text) {
    return nonBlankLines(text).map(({ raw, line }) => {
      const tab = raw.indexOf("\t");
      if (tab < 0) throw new DataError(`line ${line}: expected LABEL<TAB>TEXT`);
      return { text: raw.slice(tab + 1), label: raw.slice(0, tab).trim(), line };
    });
  }

  /** The format a file name's extension names, or null. */
  function formatOf(name) {
    const extension = (name.match(/\.([^.]+)$/) || [])[1];
    switch ((extension || "").toLowerCase()) {
      case "csv":
        return "csv";
      case "jsonl":
      case "ndjson":
        return "jsonl";
      case "tsv":
      case "txt":
        return "tsv";
      default:
        return null;
    }
  }

  /** The examples of a text file's contents, by the format its name tells. */
  function parseTextFile(name, text) {
    const format = formatOf(name);
    if (!format) {
      throw new DataError(
        `cannot tell the format of ${name} from its extension: use .csv (text and label columns), ` +
          ".jsonl (objects with text and label) or .tsv (LABEL<TAB>TEXT lines)",
      );
    }
    const body = text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
    const parse = { csv: parseCsv, jsonl: parseJsonl, tsv: parseTsv }[format];
    let examples;
    try {
      examples = parse(body);
    } catch (err) {
      if (err instanceof DataError) throw new DataError(`${name} ${err.message}`);
      throw err;
    }
    if (examples.length === 0) throw new DataError(`${name} holds no examples`);
    return examples;
  }

  const IMAGE_EXTENSIONS = ["png", "jpg", "jpeg", "webp"];

  /** Whether a file name has an image extension the server decodes. */
  function isImageName(name) {
    const extension = (name.match(/\.([^.]+)$/) || [])[1];
    return IMAGE_EXTENSIONS.includes((extension || "").toLowerCase());
  }

  /** Whether a file's first bytes start a PNG, JPEG or WebP image. */
  function isImageMagic(head) {
    const starts = (bytes) => bytes.every((b, i) => head[i] === b);
    return (
      starts([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]) ||
      starts([0xff, 0xd8, 0xff]) ||
      (head.length >= 12 && starts([0x52, 0x49, 0x46, 0x46]) &&
        head[8] === 0x57 && head[9] === 0x45 && head[10] === 0x42 && head[11] === 0x50)
    );
  }

  /**
   * Groups the files of a chosen folder (each with a webkitRelativePath such
   * as "photos/cat/1.jpg") by class: the first subfolder below the chosen one
   * is the label; files at any depth below it belong to it. Returns
   * {images: [{file, label, path}], skipped: [paths]} in path order.
   */
  function groupImageFolder(files) {
    const images = [];
    const skipped = [];
    const sorted = Array.from(files).sort((a, b) =>
      (a.webkitRelativePath || a.name).localeCompare(b.webkitRelativePath || b.name),
    );
    for (const file of sorted) {
      const path = file.webkitRelativePath || file.name;
      const parts = path.split("/");
      if (parts.some((p) => p.startsWith("."))) continue; // hidden files and folders
      if (parts.length < 3 || !isImageName(path)) {
        skipped.push(path);
        continue;
      }
      images.push({ file, label: parts[1], path });
    }
    return { images, skipped };
  }

  /** Counts per label, in label order. */
  function labelCounts(examples) {
    const counts = new Map();
    for (const { label } of examples) counts.set(label, (counts.get(label) || 0) + 1);
    return new Map([...counts.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
  }

  /** A small seeded generator (mulberry32): the same seed gives the same split. */
  function rng(seed) {
    let state = seed >>> 0;
    return () => {
      state = (state + 0x6d2b79f5) >>> 0;
      let t = state;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  /**
   * How many of a label's `count` examples are held out: the share rounded,
   * but never every one (the head must see each label).
   */
  function heldOutCount(count, share) {
    return Math.min(Math.round(count * share), Math.max(0, count - 1));
  }

  /**
   * Holds out `share` of each label's examples, chosen by a shuffle seeded
   * with `seed`; both parts keep the input order.
   */
  function stratifiedSplit(examples, share, seed) {
    if (!(share > 0 && share < 1)) return { train: examples.slice(), holdout: [] };
    const byLabel = new Map();
    examples.forEach((example, index) => {
      if (!byLabel.has(example.label)) byLabel.set(example.label, []);
      byLabel.get(example.label).push(index);
    });
    const random = rng(seed);
    const held = new Set();
    for (const label of [...byLabel.keys()].sort()) {
      const indices = byLabel.get(label);
      for (let i = indices.length - 1; i > 0; i--) {
        const j = Math.floor(random() * (i + 1));
        [indices[i], indices[j]] = [indices[j], indices[i]];
      }
      indices.slice(0, heldOutCount(indices.length, share)).forEach((i) => held.add(i));
    }
    return {
      train: examples.filter((_, i) => !held.has(i)),
      holdout: examples.filter((_, i) => held.has(i)),
    };
  }

  /**
   * The confusion matrix of predicted against true labels over `labels`
   * (rows: true, columns: predicted), the accuracy, and per-label recall.
   */
  function confusionMatrix(labels, truth, predicted) {
    const index = new Map(labels.map((label, i) => [label, i]));
    const counts = labels.map(() => labels.map(() => 0));
    let right = 0;
    truth.forEach((label, i) => {
      const row = index.get(label);
      const column = index.get(predicted[i]);
      if (row === undefined || column === undefined) return;
      counts[row][column] += 1;
      if (row === column) right += 1;
    });
    return { labels, counts, total: truth.length, accuracy: truth.length ? right / truth.length : 0 };
  }

  return {
    DataError,
    parseCsvRows,
    parseCsv,
    parseJsonl,
    parseTsv,
    formatOf,
    parseTextFile,
    isImageName,
    isImageMagic,
    groupImageFolder,
    labelCounts,
    rng,
    heldOutCount,
    stratifiedSplit,
    confusionMatrix,
  };
})();
