#!/usr/bin/env node
// A small Node.js client of onnxplain, built from the contract alone: it loads proto/onnxplain/v1/*.proto at
// run time with @grpc/proto-loader (no generated code) and calls the service with @grpc/grpc-js.
//
//   node onnxplain.js [--server HOST:PORT] models
//   node onnxplain.js [--server HOST:PORT] explain IMAGE... --model M --method NAME [--method ...]
//                     [--param key=value | method.key=value ...] [--target ID|LABEL ...] [--top-k K]
//                     [--normalize none|minmax|maxabs] --out DIR
//
// `explain` streams one Explain call and writes, per final map, DIR/<image-stem>.<method>.<class>.npy (float32
// [H, W], the bytes the server sent, as numpy reads them) and, at the end, DIR/summary.json (accepted, every
// final map's file, shape and min/max/mean, done). Exit status: 0, 1 when the server answers with an error
// (printed as "CODE: message"), 2 on a usage error.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');

function load(protoRoot) {
  const definition = protoLoader.loadSync(
    ['onnxplain/v1/tensor.proto', 'onnxplain/v1/methods.proto', 'onnxplain/v1/service.proto'],
    { includeDirs: [protoRoot], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
  return { v1: grpc.loadPackageDefinition(definition).onnxplain.v1, definition };
}

class UsageError extends Error {}

function parseArgs(argv) {
  const args = { server: '127.0.0.1:50051', protoRoot: DEFAULT_PROTO_ROOT, positional: [], method: [], param: [],
                 target: [], topK: 0, normalize: 'none', model: '', out: '', timeout: 0 };
  const valued = { '--server': 'server', '--proto-root': 'protoRoot', '--model': 'model', '--out': 'out',
                   '--top-k': 'topK', '--normalize': 'normalize', '--timeout': 'timeout' };
  const repeated = { '--method': 'method', '--param': 'param', '--target': 'target' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a in valued || a in repeated) {
      if (i + 1 >= argv.length) throw new UsageError(`${a} wants a value`);
      const value = argv[++i];
      if (a in repeated) args[repeated[a]].push(value);
      else args[valued[a]] = value;
    } else if (a.startsWith('--')) {
      throw new UsageError(`unknown option ${a}`);
    } else {
      args.positional.push(a);
    }
  }
  args.command = args.positional.shift();
  args.topK = Number(args.topK);
  args.timeout = Number(args.timeout);
  return args;
}

// The descriptor of a message type as proto-loader exposes it (a DescriptorProto object).
function fieldsOf(definition, typeName) {
  const type = definition[`onnxplain.v1.${typeName}`];
  return type ? Object.fromEntries(type.type.field.map((f) => [f.name, f])) : null;
}

function typedValue(field, text, where) {
  switch (field.type) {
    case 'TYPE_BOOL':
      return ['1', 'true', 'yes', 'on'].includes(String(text).toLowerCase());
    case 'TYPE_FLOAT': case 'TYPE_DOUBLE': case 'TYPE_INT32': case 'TYPE_INT64': case 'TYPE_UINT32':
    case 'TYPE_UINT64': {
      const n = Number(text);
      if (!Number.isFinite(n)) throw new UsageError(`${where}: cannot use ${JSON.stringify(text)}: not a number`);
      return n;
    }
    case 'TYPE_ENUM':
      return String(text).toUpperCase();
    default:
      return text;
  }
}

// MethodSpecs from --method names and --param key=value (every method) or method.key=value (that one).
function methodSpecs(definition, names, params) {
  const specFields = fieldsOf(definition, 'MethodSpec');
  const specs = names.map((name) => ({ method: name }));
  for (const item of params) {
    const eq = item.indexOf('=');
    if (eq <= 0) throw new UsageError(`--param wants key=value, got ${JSON.stringify(item)}`);
    const key = item.slice(0, eq);
    const value = item.slice(eq + 1);
    const dot = key.lastIndexOf('.');
    const only = dot >= 0 ? key.slice(0, dot) : null;
    const name = dot >= 0 ? key.slice(dot + 1) : key;
    if (only !== null && !names.includes(only)) {
      throw new UsageError(`--param ${JSON.stringify(item)} names method ${only}, which is not requested`);
    }
    for (const spec of specs) {
      if (only !== null && spec.method !== only) continue;
      const slot = specFields[spec.method];
      if (!slot || slot.oneofIndex === undefined) {
        throw new UsageError(`method ${spec.method} has no parameter message in this contract`);
      }
      const paramFields = fieldsOf(definition, slot.typeName.replace(/^\.?onnxplain\.v1\./, ''));
      if (!(name in paramFields)) {
        throw new UsageError(`${spec.method} has no parameter ${name}; it takes ${Object.keys(paramFields).sort()}`);
      }
      spec[spec.method] = spec[spec.method] || {};
      spec[spec.method][name] = typedValue(paramFields[name], value, `${spec.method}.${name}`);
    }
  }
  return specs;
}

// A .npy file (format 1.0) holding a little-endian float32 array of `shape` whose raw bytes are `data`.
function npy(shape, data) {
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(', ');
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${dims}), }`;
  const unpadded = 10 + header.length + 1;
  header += ' '.repeat((64 - (unpadded % 64)) % 64) + '\n';
  const prefix = Buffer.alloc(10);
  Buffer.from([0x93]).copy(prefix, 0);
  prefix.write('NUMPY', 1, 'latin1');
  prefix[6] = 1;
  prefix[7] = 0;
  prefix.writeUInt16LE(header.length, 8);
  return Buffer.concat([prefix, Buffer.from(header, 'latin1'), data]);
}

function mapStats(tensor) {
  const n = tensor.data.length / 4;
  let min = Infinity;
  let max = -Infinity;
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const v = tensor.data.readFloatLE(4 * i);
    min = Math.min(min, v);
    max = Math.max(max, v);
    sum += v;
  }
  return { min, max, mean: n ? sum / n : 0 };
}

function deadline(args) {
  return args.timeout > 0 ? { deadline: Date.now() + 1000 * args.timeout } : {};
}

function listModels(client, args) {
  return new Promise((resolve, reject) => {
    client.ListModels({}, deadline(args), (err, response) => {
      if (err) return reject(err);
      for (const m of response.models) {
        console.log(`${m.name}\t${m.num_classes} classes\t${m.execution_provider}\t${m.description}`);
      }
      resolve();
    });
  });
}

function explain(client, definition, args) {
  if (!args.positional.length) throw new UsageError('explain wants at least one IMAGE');
  if (!args.model) throw new UsageError('explain wants --model');
  if (!args.method.length) throw new UsageError('explain wants --method');
  if (!args.out) throw new UsageError('explain wants --out');
  const norms = { none: 'NONE', minmax: 'MINMAX', maxabs: 'MAX_ABS' };
  if (!(args.normalize in norms)) throw new UsageError('--normalize wants none, minmax or maxabs');
  const names = args.method.flatMap((m) => m.split(',')).filter(Boolean);
  const targets = args.target.map((t) => (/^-?\d+$/.test(t) ? { id: Number(t) } : { name: t }));
  const request = {
    model: args.model,
    images: args.positional.map((p) => ({ encoded: fs.readFileSync(p), name: path.basename(p) })),
    methods: methodSpecs(definition, names, args.param),
    targets: { class_ids: targets.filter((t) => 'id' in t).map((t) => t.id),
               class_names: targets.filter((t) => 'name' in t).map((t) => t.name), top_k: args.topK },
    output: { normalization: norms[args.normalize] },
  };
  fs.mkdirSync(args.out, { recursive: true });
  const stems = args.positional.map((p) => path.basename(p, path.extname(p)));
  const summary = { accepted: null, maps: [], done: null };
  return new Promise((resolve, reject) => {
    const call = client.Explain(request, deadline(args));
    call.on('data', (event) => {
      if (event.event === 'accepted') {
        const a = event.accepted;
        summary.accepted = { job_id: a.job_id, model: a.model, execution_provider: a.execution_provider,
                             total_maps: a.total_maps };
        process.stderr.write(`accepted: ${a.total_maps} maps on ${a.execution_provider}\n`);
      } else if (event.event === 'progress') {
        const p = event.progress;
        process.stderr.write(`progress: image ${p.image_index} ${p.method} ${p.done}/${p.total}\n`);
      } else if (event.event === 'map' && event.map.final) {
        const m = event.map;
        if (m.map.dtype !== 'DTYPE_FLOAT32') {
          call.cancel();
          reject(new Error(`map of dtype ${m.map.dtype}: this client writes FLOAT32 maps only`));
          return;
        }
        const file = path.join(args.out, `${stems[m.image_index]}.${m.method}.${m.class_id}.npy`);
        fs.writeFileSync(file, npy(m.map.shape, m.map.data));
        summary.maps.push({ image_index: m.image_index, image_name: m.image_name, method: m.method,
                            class_id: m.class_id, label: m.label, layer: m.layer, shape: m.map.shape,
                            ...mapStats(m.map), file: path.basename(file) });
        console.log(file);
      } else if (event.event === 'done') {
        const d = event.done;
        summary.done = { maps: d.maps, total_ms: d.timings.total_ms, forward_samples: d.forward_samples,
                         backward_samples: d.backward_samples, model_runs: d.model_runs };
      }
    });
    let failed = false;
    call.on('error', (err) => { failed = true; reject(err); });
    call.on('end', () => {
      if (failed) return;   // grpc-js may end the stream after an error status: no summary then
      fs.writeFileSync(path.join(args.out, 'summary.json'), JSON.stringify(summary, null, 1) + '\n');
      resolve();
    });
  });
}

async function main(argv) {
  let args;
  try {
    args = parseArgs(argv);
    const { v1, definition } = load(args.protoRoot);
    const options = { 'grpc.max_receive_message_length': 64 * 1024 * 1024,
                      'grpc.max_send_message_length': 64 * 1024 * 1024 };
    const client = new v1.Explainer(args.server, grpc.credentials.createInsecure(), options);
    try {
      if (args.command === 'models') await listModels(client, args);
      else if (args.command === 'explain') await explain(client, definition, args);
      else throw new UsageError(`unknown command ${JSON.stringify(args.command)}: models or explain`);
    } finally {
      client.close();
    }
  } catch (err) {
    if (err instanceof UsageError || err.code === 'ENOENT') {
      process.stderr.write(`onnxplain-node: error: ${err.message}\n`);
      return 2;
    }
    if (typeof err.code === 'number') {
      process.stderr.write(`onnxplain-node: error: ${grpc.status[err.code]}: ${err.details}\n`);
      return 1;
    }
    throw err;
  }
  return 0;
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
}

module.exports = { load, main, methodSpecs, npy };
