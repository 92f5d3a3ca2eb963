// A client in another language that has no .proto file: it finds bild.v1.Generator through server
// reflection, by the method symbol that ghz and grpcurl ask for, then streams one generation.
// Usage: node generate.js HOST:PORT PROMPT MAX_NEW_TOKENS  -> prints one JSON line
const grpc = require("@grpc/grpc-js");
const { GrpcReflection } = require("grpc-js-reflection-client");

async function main() {
  const [target, prompt, maxNewTokens] = process.argv.slice(2);
  const reflection = new GrpcReflection(target, grpc.credentials.createInsecure());
  const services = await reflection.listServices();
  const descriptor = await reflection.getDescriptorBySymbol("bild.v1.Generator.Generate");
  const pkg = descriptor.getPackageObject({ keepCase: true, enums: String, longs: String, defaults: true });
  const client = new pkg.bild.v1.Generator(target, grpc.credentials.createInsecure());
  const call = client.Generate({ prompt, max_new_tokens: Number(maxNewTokens), mode: "DECODING_MODE_EXACT" });
  let text = "";
  const tokenIds = [];
  let last = null;
  call.on("data", (response) => {
    text += response.text;
    tokenIds.push(...response.token_ids);
    last = response;
  });
  call.on("error", (error) => {
    console.log(JSON.stringify({ error: error.code, details: error.details }));
    process.exit(1);
  });
  call.on("end", () => {
    console.log(JSON.stringify({ services, text, token_ids: tokenIds, finish_reason: last.finish_reason }));
    client.close();
  });
}

main().catch((error) => {
  console.error(error);
  process.exit(2);
});
