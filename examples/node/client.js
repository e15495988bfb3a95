#!/usr/bin/env node
// A Node.js client for tlserve: embeds texts, trains a head from a JSON Lines
// file and predicts with it. It loads the service definitions from the
// repository's proto/ folder at run time, so there is no generated code.
//
// Usage: see USAGE below, or run `node client.js` with no arguments.
// Every command prints JSON on stdout; training progress goes to stderr.
'use strict';

const fs = require('fs');
const path = require('path');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = `usage: node client.js [--addr HOST:PORT] COMMAND ...

commands:
  embed   --backbone NAME TEXT...
  train   --backbone NAME --head NAME --examples FILE.jsonl
  predict --head NAME [--top-k N] TEXT...

--addr defaults to localhost:50051. Set TLSERVE_TOKEN to send it as a bearer
token. FILE.jsonl holds one {"text": "...", "label": "..."} object per line.`;

// The repository's proto/ folder; a copy of this client elsewhere points it
// at a copy of that folder.
const PROTO_DIR = path.join(__dirname, '..', '..', 'proto');
const CALL_TIMEOUT_MS = 60_000;

// keepCase: fields keep their proto names (head_name, total_epochs), as in
// grpcurl's requests. Enums come as their names, 64-bit integers as numbers,
// and unset fields as their zero values.
function loadServices() {
  const files = ['embedder', 'predictor', 'trainer'].map((name) => `tlserve/v1/${name}.proto`);
  const definition = protoLoader.loadSync(files, {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    enums: String,
    longs: Number,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).tlserve.v1;
}

class UsageError extends Error {}

function parseCommandLine(argv) {
  const options = {
    addr: { type: 'string', default: 'localhost:50051' },
    backbone: { type: 'string' },
    head: { type: 'string' },
    examples: { type: 'string' },
    'top-k': { type: 'string', default: '0' },
  };
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError(err.message);
  }
  const [command, ...texts] = parsed.positionals;
  return { command, texts, ...parsed.values };
}

function required(args, ...names) {
  for (const name of names) {
    if (!args[name]) throw new UsageError(`${args.command} needs --${name}`);
  }
}

function needTexts(args) {
  if (args.texts.length === 0) throw new UsageError(`${args.command} needs at least one TEXT`);
  return args.texts.map((text) => ({ text }));
}

// Every call carries the bearer token when TLSERVE_TOKEN is set.
function metadata() {
  const md = new grpc.Metadata();
  if (process.env.TLSERVE_TOKEN) md.set('authorization', `Bearer ${process.env.TLSERVE_TOKEN}`);
  return md;
}

// A unary call as a promise, with a deadline.
function unary(client, method, request) {
  const deadline = new Date(Date.now() + CALL_TIMEOUT_MS);
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), { deadline }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

function printJson(value) {
  process.stdout.write(JSON.stringify(value) + '\n');
}

async function embed(services, args) {
  required(args, 'backbone');
  const client = new services.Embedder(args.addr, grpc.credentials.createInsecure());
  const response = await unary(client, 'Embed', { backbone: args.backbone, inputs: needTexts(args) });
  printJson({
    backbone: response.backbone,
    dimension: response.dimension,
    embeddings: response.embeddings.map((e) => e.values),
  });
}

function readExamples(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new Error(`cannot read ${file}: ${err.message}`);
  }
  const examples = [];
  text.split('\n').forEach((line, i) => {
    if (!line.trim()) return;
    let row;
    try {
      row = JSON.parse(line);
    } catch (err) {
      throw new Error(`${file}:${i + 1}: not JSON: ${err.message}`);
    }
    if (typeof row.text !== 'string' || typeof row.label !== 'string') {
      throw new Error(`${file}:${i + 1}: needs string fields "text" and "label"`);
    }
    examples.push({ input: { text: row.text }, label: row.label });
  });
  return examples;
}

function fixed(x) {
  return x == null ? '-' : x.toFixed(3);
}

// One line per event, for a person watching the job.
function describe(event) {
  const state = event.state.replace('JOB_STATE_', '');
  const m = event.metrics;
  switch (event.state) {
    case 'JOB_STATE_EMBEDDING':
      return `${state} ${event.embedded}/${event.total_inputs}`;
    case 'JOB_STATE_TRAINING':
      if (!m) return `${state} started: ${event.total_epochs} epochs planned`;
      return `${state} epoch ${event.epoch}/${event.total_epochs} loss ${fixed(m.train_loss)} ` +
        `accuracy ${fixed(m.train_accuracy)} validation accuracy ${fixed(m.validation_accuracy)}`;
    case 'JOB_STATE_SUCCEEDED':
      return `${state} published ${event.head.name}@${event.head.version}`;
    default:
      return event.error ? `${state} ${event.error}` : state;
  }
}

async function train(services, args) {
  required(args, 'backbone', 'head', 'examples');
  const request = {
    backbone: args.backbone,
    head_name: args.head,
    examples: { examples: readExamples(args.examples) },
  };
  const client = new services.Trainer(args.addr, grpc.credentials.createInsecure());
  // No deadline: the job streams events until it ends.
  const stream = client.TrainHead(request, metadata());
  let last;
  for await (const event of stream) {
    console.error(describe(event));
    last = event;
  }
  if (!last) throw new Error('the server ended the stream without an event');
  const result = { job_id: last.job_id, state: last.state };
  if (last.state === 'JOB_STATE_SUCCEEDED') {
    Object.assign(result, {
      head: last.head.name,
      version: last.head.version,
      labels: last.head.labels,
      metrics: last.head.metrics,
    });
  } else {
    result.error = last.error;
  }
  printJson(result);
  if (last.state !== 'JOB_STATE_SUCCEEDED') process.exitCode = 1;
}

async function predict(services, args) {
  required(args, 'head');
  const topK = Number(args['top-k']);
  if (!Number.isInteger(topK) || topK < 0) throw new UsageError('--top-k needs a whole number');
  const client = new services.Predictor(args.addr, grpc.credentials.createInsecure());
  printJson(await unary(client, 'Predict', { head: args.head, inputs: needTexts(args), top_k: topK }));
}

const COMMANDS = { embed, train, predict };

async function main() {
  try {
    const args = parseCommandLine(process.argv.slice(2));
    const run = COMMANDS[args.command];
    if (!run) throw new UsageError(args.command ? `unknown command ${args.command}` : 'no command given');
    await run(loadServices(), args);
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`error: ${err.message}\n\n${USAGE}`);
      process.exitCode = 2;
    } else if (typeof err.code === 'number') {
      // A gRPC status: its code's name, as in the proto's documentation.
      const name = Object.keys(grpc.status).find((key) => grpc.status[key] === err.code);
      console.error(`error: ${name}: ${err.details || err.message}`);
      process.exitCode = 1;
    } else {
      console.error(`error: ${err.message}`);
      process.exitCode = 1;
    }
  }
}

main();
