// Run a qcompiler-compiled model with ONNX Runtime's Node.js binding (onnxruntime-node, CPU).
//
//   node main.mjs model.q.onnx [threads]
//
// Feeds the model's first input (float32; dynamic dimensions set to 1) with x[i] = ((i % 17) - 8) / 8 and prints
// each output's name, shape and values, one value a line (%.9g, so a float32 round-trips).
import * as ort from 'onnxruntime-node';

const [modelPath, threadsArg = '1'] = process.argv.slice(2);
if (!modelPath) {
  console.error('usage: node main.mjs model.onnx [threads]');
  process.exit(2);
}
const threads = Number(threadsArg);

const session = await ort.InferenceSession.create(modelPath, {
  executionProviders: ['cpu'],
  graphOptimizationLevel: 'all',
  intraOpNumThreads: threads,          // threads inside one op (0: one per physical core)
  interOpNumThreads: 1,                // threads across independent ops (only used in parallel execution mode)
  executionMode: 'sequential',
  extra: { session: { intra_op: { allow_spinning: '0' } } },  // idle threads sleep instead of spinning
});

if (!session.inputMetadata) throw new Error('needs onnxruntime-node >= 1.22 (InferenceSession.inputMetadata)');
const meta = session.inputMetadata[0];
if (!meta.isTensor || meta.type !== 'float32') {
  throw new Error(`input ${meta.name} is not a float32 tensor`);
}
const shape = meta.shape.map((d) => (typeof d === 'number' && d > 0 ? d : 1));
const size = shape.reduce((a, b) => a * b, 1);
const data = Float32Array.from({ length: size }, (_, i) => ((i % 17) - 8) / 8);

const results = await session.run({ [meta.name]: new ort.Tensor('float32', data, shape) });
for (const name of session.outputNames) {
  const out = results[name];
  console.log(`output ${name} ${out.type} [${out.dims.join(',')}]`);
  for (const v of out.data) console.log(Number(v).toPrecision(9));
}
await session.release();
