/*
 * A small gRPC-Web client over fetch: binary protobuf framing
 * (application/grpc-web+proto), unary and server-streaming calls.
 *
 * Wire format (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md):
 * the request and response bodies are frames of one flag byte, a 4-byte
 * big-endian length and the payload. Flag 0x00 carries a message; flag 0x80
 * carries the trailers as HTTP/1-style header lines ("grpc-status: 0\r\n...").
 * A call that fails before any message may answer "trailers-only": the status
 * in the response headers and an empty body.
 *
 * A classic script: it defines self.GrpcWeb.
 */
self.GrpcWeb = (() => {
  "use strict";

  /** gRPC status codes by number. */
  const STATUS_NAMES = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
  ];
  const Code = Object.freeze(
    Object.fromEntries(STATUS_NAMES.map((name, number) => [name, number])),
  );

  const DATA_FLAG = 0x00;
  const TRAILER_FLAG = 0x80;
  const COMPRESSED_FLAG = 0x01;
  const HEADER_BYTES = 5;
  /** Refuse to buffer a single response message larger than this. */
  const MAX_RESPONSE_MESSAGE_BYTES = 64 * 1024 * 1024;

  function codeName(code) {
    return STATUS_NAMES[code] || `CODE_${code}`;
  }

  /** A failed call: a gRPC status code and the server's message. */
  class GrpcError extends Error {
    constructor(code, message, details) {
      super(message);
      this.name = "GrpcError";
      this.code = code;
      this.codeName = codeName(code);
      this.httpStatus = details && details.httpStatus;
    }

    /** "NOT_FOUND: no head named x", for people. */
    describe() {
      return this.message ? `${this.codeName}: ${this.message}` : this.codeName;
    }
  }

  /** One request frame: flag 0, the length, the encoded message. */
  function frame(message) {
    const out = new Uint8Array(HEADER_BYTES + message.length);
    out[0] = DATA_FLAG;
    new DataView(out.buffer).setUint32(1, message.length, false);
    out.set(message, HEADER_BYTES);
    return out;
  }

  /**
   * Splits a byte stream into frames as chunks arrive. push() returns the
   * frames completed by a chunk; finish() throws when a frame was cut short.
   */
  class FrameReader {
    constructor(maxFrameBytes = MAX_RESPONSE_MESSAGE_BYTES) {
      this.buffer = new Uint8Array(0);
      this.maxFrameBytes = maxFrameBytes;
    }

    push(chunk) {
      if (chunk && chunk.length) {
        const joined = new Uint8Array(this.buffer.length + chunk.length);
        joined.set(this.buffer, 0);
        joined.set(chunk, this.buffer.length);
        this.buffer = joined;
      }
      const frames = [];
      let at = 0;
      while (this.buffer.length - at >= HEADER_BYTES) {
        const view = new DataView(this.buffer.buffer, this.buffer.byteOffset + at, HEADER_BYTES);
        const flag = view.getUint8(0);
        const length = view.getUint32(1, false);
        if (length > this.maxFrameBytes) {
          throw new GrpcError(
            Code.RESOURCE_EXHAUSTED,
            `the server sent a ${length}-byte message; this console reads at most ${this.maxFrameBytes}`,
          );
        }
        if (this.buffer.length - at - HEADER_BYTES < length) break;
        const start = at + HEADER_BYTES;
        frames.push({ flag, payload: this.buffer.slice(start, start + length) });
        at = start + length;
      }
      if (at > 0) this.buffer = this.buffer.slice(at);
      return frames;
    }

    finish() {
      if (this.buffer.length > 0) {
        throw new GrpcError(
          Code.INTERNAL,
          `the response ended inside a frame (${this.buffer.length} bytes left over)`,
        );
      }
    }
  }

  /** grpc-message is percent-encoded UTF-8; a malformed one is shown as sent. */
  function decodeGrpcMessage(value) {
    if (!value) return "";
    try {
      return decodeURIComponent(value);
    } catch (_) {
      return value;
    }
  }

  /** The header lines of a trailer frame, as a Map of lower-case names. */
  function parseTrailers(payload) {
    const text = new TextDecoder().decode(payload);
    const trailers = new Map();
    for (const line of text.split(/\r?\n/)) {
      const colon = line.indexOf(":");
      if (colon <= 0) continue;
      trailers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
    }
    return trailers;
  }

  /**
   * The status of a Map or Headers of grpc-status / grpc-message; null when
   * there is no grpc-status.
   */
  function statusOf(fields) {
    const raw = fields.get("grpc-status");
    if (raw === null || raw === undefined || raw === "") return null;
    const code = Number.parseInt(raw, 10);
    return {
      code: Number.isInteger(code) ? code : Code.UNKNOWN,
      message: decodeGrpcMessage(fields.get("grpc-message") || ""),
    };
  }

  /** The gRPC code for an HTTP error without a gRPC status (as gRPC clients map it). */
  function codeForHttpStatus(status) {
    switch (status) {
      case 400:
        return Code.INTERNAL;
      case 401:
        return Code.UNAUTHENTICATED;
      case 403:
        return Code.PERMISSION_DENIED;
      case 404:
        return Code.UNIMPLEMENTED;
      case 429:
      case 502:
      case 503:
      case 504:
        return Code.UNAVAILABLE;
      default:
        return Code.UNKNOWN;
    }
  }

  /**
   * Calls `path` ("/pkg.Service/Method") with one encoded request message and
   * calls onMessage(bytes) for every response message. Resolves when the call
   * ends with OK; rejects with a GrpcError otherwise.
   *
   * options: baseUrl (default: the page's origin), headers (extra request
   * headers, e.g. authorization), signal (an AbortSignal), fetch (for tests).
   */
  async function call(path, requestBytes, onMessage, options = {}) {
    const doFetch = options.fetch || fetch;
    const url = new URL(path.replace(/^\//, ""), options.baseUrl || globalThis.location.origin + "/");
    const headers = Object.assign(
      {
        "content-type": "application/grpc-web+proto",
        accept: "application/grpc-web+proto",
        "x-grpc-web": "1",
      },
      options.headers || {},
    );
    let response;
    try {
      response = await doFetch(url.toString(), {
        method: "POST",
        headers,
        body: frame(requestBytes),
        signal: options.signal,
        cache: "no-store",
        credentials: "same-origin",
      });
    } catch (err) {
      if (err && err.name === "AbortError") {
        throw new GrpcError(Code.CANCELLED, "the call was cancelled here");
      }
      throw new GrpcError(
        Code.UNAVAILABLE,
        `cannot reach the server (${err && err.message ? err.message : err})`,
      );
    }

    const headerStatus = statusOf(response.headers);
    const contentType = (response.headers.get("content-type") || "").toLowerCase();
    if (!response.ok || !contentType.startsWith("application/grpc-web")) {
      await response.body?.cancel().catch(() => {});
      if (headerStatus && headerStatus.code !== Code.OK) {
        throw new GrpcError(headerStatus.code, headerStatus.message, { httpStatus: response.status });
      }
      if (!response.ok) {
        throw new GrpcError(
          codeForHttpStatus(response.status),
          `HTTP ${response.status} ${response.statusText || ""}`.trim(),
          { httpStatus: response.status },
        );
      }
      throw new GrpcError(
        Code.UNKNOWN,
        `the server answered with content-type "${contentType || "none"}", not gRPC-Web`,
        { httpStatus: response.status },
      );
    }

    // Trailers-only: the status is in the headers and the body is empty.
    if (headerStatus && headerStatus.code !== Code.OK) {
      await response.body?.cancel().catch(() => {});
      throw new GrpcError(headerStatus.code, headerStatus.message, { httpStatus: response.status });
    }

    const reader = new FrameReader(options.maxMessageBytes);
    let trailerStatus = null;
    const handle = (frames) => {
      for (const { flag, payload } of frames) {
        if (trailerStatus) {
          throw new GrpcError(Code.INTERNAL, "the server sent data after its trailers");
        }
        if (flag & TRAILER_FLAG) {
          trailerStatus = statusOf(parseTrailers(payload)) || {
            code: Code.INTERNAL,
            message: "the trailers carry no grpc-status",
          };
        } else if (flag & COMPRESSED_FLAG) {
          throw new GrpcError(Code.INTERNAL, "the server sent a compressed message; this console asks for none");
        } else {
          onMessage(payload);
        }
      }
    };

    if (response.body) {
      const stream = response.body.getReader();
      try {
        for (;;) {
          let chunk;
          try {
            chunk = await stream.read();
          } catch (err) {
            if (err && err.name === "AbortError") {
              throw new GrpcError(Code.CANCELLED, "the call was cancelled here");
            }
            throw new GrpcError(
              Code.UNAVAILABLE,
              `the connection broke while reading the response (${err && err.message ? err.message : err})`,
            );
          }
          if (chunk.done) break;
          handle(reader.push(chunk.value));
        }
      } catch (err) {
        stream.cancel().catch(() => {});
        throw err;
      }
    }
    reader.finish();

    const status = trailerStatus || headerStatus;
    if (!status) {
      throw new GrpcError(Code.UNAVAILABLE, "the response ended without a status: the connection was cut");
    }
    if (status.code !== Code.OK) {
      throw new GrpcError(status.code, status.message, { httpStatus: response.status });
    }
  }

  /** A unary call: resolves to the one response message's bytes. */
  async function unary(path, requestBytes, options) {
    const messages = [];
    await call(path, requestBytes, (bytes) => messages.push(bytes), options);
    if (messages.length !== 1) {
      throw new GrpcError(
        Code.INTERNAL,
        `a unary call answered with ${messages.length} messages instead of one`,
      );
    }
    return messages[0];
  }

  return {
    Code,
    STATUS_NAMES,
    codeName,
    GrpcError,
    frame,
    FrameReader,
    parseTrailers,
    decodeGrpcMessage,
    statusOf,
    codeForHttpStatus,
    call,
    unary,
  };
})();
