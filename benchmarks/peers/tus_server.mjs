// Peer tus server for the tusd-py benchmarks: @tus/server with @tus/file-store or
// @tus/s3-store, on a given port, upload endpoint /files/.
//
//   node benchmarks/peers/tus_server.mjs --port 1081 --directory /tmp/peer-data
//   node benchmarks/peers/tus_server.mjs --port 1081 --store s3 \
//        --s3-endpoint http://127.0.0.1:5000 --s3-bucket bench
//
// S3 settings may also come from the environment: TUS_S3_ENDPOINT, TUS_S3_BUCKET,
// AWS_REGION (default us-east-1), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (default
// "testing", which is what moto accepts). Path-style addressing is always on, because
// moto and most S3-compatible services on a loopback port have no per-bucket hostnames.
//
// When it listens, it prints one line "listening on http://HOST:PORT/files/" to stdout
// (PORT is the real one when --port 0 was given), so a harness can wait for that line
// or simply connect. SIGTERM/SIGINT close the listener and exit.

import http from "node:http";
import { parseArgs } from "node:util";

import { FileStore } from "@tus/file-store";
import { Server } from "@tus/server";

const { values: args } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "1081" },
    store: { type: "string", default: "file" },
    directory: { type: "string", default: "./peer-data" },
    "s3-endpoint": { type: "string", default: process.env.TUS_S3_ENDPOINT ?? "" },
    "s3-bucket": { type: "string", default: process.env.TUS_S3_BUCKET ?? "" },
    "s3-part-size": { type: "string", default: String(8 * 1024 * 1024) },
  },
});

async function buildStore() {
  if (args.store === "file") {
    return new FileStore({ directory: args.directory });
  }
  if (args.store === "s3") {
    if (!args["s3-bucket"]) {
      throw new Error("--s3-bucket (or TUS_S3_BUCKET) is required with --store s3");
    }
    // Imported lazily so the file-store peer does not load the AWS SDK (it would add
    // tens of MiB to the peer's RSS and distort the memory comparison).
    const { S3Store } = await import("@tus/s3-store");
    const s3ClientConfig = {
      bucket: args["s3-bucket"],
      region: process.env.AWS_REGION ?? "us-east-1",
      forcePathStyle: true,
      credentials: {
        accessKeyId: process.env.AWS_ACCESS_KEY_ID ?? "testing",
        secretAccessKey: process.env.AWS_SECRET_ACCESS_KEY ?? "testing",
      },
    };
    if (args["s3-endpoint"]) {
      s3ClientConfig.endpoint = args["s3-endpoint"];
    }
    return new S3Store({ partSize: Number(args["s3-part-size"]), s3ClientConfig });
  }
  throw new Error(`--store must be "file" or "s3", got ${JSON.stringify(args.store)}`);
}

const tus = new Server({ path: "/files", datastore: await buildStore() });

const server = http.createServer((req, res) => {
  tus.handle(req, res).catch((error) => {
    console.error("request failed:", error);
    if (!res.headersSent) {
      res.writeHead(500);
    }
    res.end();
  });
});
// Node's defaults would end a slow 1 GiB PATCH after 300 s (requestTimeout) and close
// an idle keep-alive connection after 5 s; tusd-py allows 75 s idle. Match tusd-py so
// both servers are measured under the same connection rules.
server.requestTimeout = 0;
server.keepAliveTimeout = 75_000;

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    // close() waits for idle keep-alive connections; do not let them hold the exit.
    server.closeAllConnections();
  });
}

server.listen(Number(args.port), args.host, () => {
  const { address, port } = server.address();
  console.log(`listening on http://${address}:${port}/files/`);
});
