// One Generate call by grpc-js, the .proto loaded at run time (no code generated here), printed as JSON:
//   node generate.js HOST:PORT PROTO_ROOT '<GenerateRequest as JSON>'
// -> {"deltas": [...], "result": {...}} or {"error": {"code": N, "details": "..."}}
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [target, protoRoot, request] = process.argv.slice(2);
const definition = loader.loadSync('zeroc/v1/generation.proto', {
  includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const zeroc = grpc.loadPackageDefinition(definition).zeroc.v1;
const client = new zeroc.GenerationService(target, grpc.credentials.createInsecure());
const call = client.Generate(JSON.parse(request), { deadline: Date.now() + 120000 });
const out = { deltas: [], result: null };
call.on('data', (message) => {
  if (message.event === 'delta') out.deltas.push(message.delta);
  else out.result = message.result;
});
// Printed once both the stream has ended (every 'data' delivered, or an 'error') and the status has come: grpc-js
// emits 'status' as the call closes, which may be before buffered messages are read, and 'end' may follow 'error'.
let failed = null;
let ended = false;
let status = false;
function finish() {
  if (!ended || !status) return;
  console.log(JSON.stringify(failed ? { error: failed } : out));
  ended = status = false;
  client.close();
}
call.on('error', (e) => { failed = { code: e.code, details: e.details }; ended = true; finish(); });
call.on('end', () => { ended = true; finish(); });
call.on('status', () => { status = true; finish(); });
