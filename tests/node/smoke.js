// A grpc-js client built from proto/ alone, as a Node user would build one:
// every .proto under proto/ is loaded with @grpc/proto-loader, nothing from
// the Python package. Runs a smoke flow against one raftstate node and
// prints one JSON object with what it saw (tests/test_node_client.py checks
// it). Usage: node smoke.js <host:port> <proto dir> <device id prefix>
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const [endpoint, protoDir, prefix] = process.argv.slice(2);
if (!endpoint || !protoDir || !prefix) {
  console.error('usage: node smoke.js <host:port> <proto dir> <device id prefix>');
  process.exit(2);
}

function protoFiles(root, dir = root) {
  const out = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...protoFiles(root, p));
    else if (entry.name.endsWith('.proto')) out.push(path.relative(root, p));
  }
  return out.sort();
}

const loadOptions = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const api = grpc.loadPackageDefinition(
  protoLoader.loadSync(protoFiles(protoDir), { ...loadOptions, includeDirs: [protoDir] }),
);
const reflectionProto = path.join(
  path.dirname(require.resolve('@grpc/reflection/package.json')), 'build', 'proto');
const reflection = grpc.loadPackageDefinition(
  protoLoader.loadSync('grpc/reflection/v1alpha/reflection.proto', {
    ...loadOptions, includeDirs: [reflectionProto],
  }),
);

// google.rpc.Status and the error detail messages, from googleapis' protos.
const googleProtos = path.dirname(require.resolve('google-proto-files/package.json'));
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => {
  const local = path.join(googleProtos, target);
  return fs.existsSync(local) ? local : path.join(path.dirname(require.resolve('protobufjs')), target);
};
rpcRoot.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const Status = rpcRoot.lookupType('google.rpc.Status');

function decodeDetails(metadata) {
  const raw = metadata.get('grpc-status-details-bin');
  if (!raw.length) return null;
  const status = Status.decode(raw[0]);
  const details = {};
  for (const any of status.details) {
    const name = any.type_url.split('/').pop();
    details[name] = rpcRoot.lookupType(name).toObject(
      rpcRoot.lookupType(name).decode(any.value), { longs: Number });
  }
  return { code: status.code, message: status.message, details };
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10000);
    client[method](request, { deadline }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

async function main() {
  const v1 = api.raftstate.v1;
  const creds = grpc.credentials.createInsecure();
  const devices = new v1.DeviceStateService(endpoint, creds);
  const cluster = new v1.ClusterService(endpoint, creds);
  const out = {};
  const id = `${prefix}-1`;
  const seq = String(Date.now() * 1000);

  const hb = await call(devices, 'Heartbeat', { device_id: id, seq, reported: { fw: '1.2.3' }, ttl_s: 60 });
  out.heartbeat = { revision: hb.revision, duplicate: hb.duplicate, stored_seq: hb.stored_seq };
  const again = await call(devices, 'Heartbeat', { device_id: id, seq, reported: { fw: '1.2.3' } });
  out.retry_duplicate = again.duplicate;

  const got = await call(devices, 'GetDevice', { device_id: id, consistency: 'CONSISTENCY_LINEARIZABLE' });
  out.get = { device_id: got.device.device_id, seq: got.device.seq, reported: got.device.reported,
              ttl_s: got.device.ttl_s, online: got.device.online };

  const listed = await call(devices, 'ListDevices', {
    prefix, page_size: 10, filter: 'ONLINE_FILTER_ONLINE', consistency: 'CONSISTENCY_SERIALIZABLE',
  });
  out.list = listed.devices.map((d) => d.device_id);

  // Watch (server streaming) from the first heartbeat's revision: the
  // created response, then that heartbeat's event, decoded from proto/ alone.
  out.watch = await new Promise((resolve, reject) => {
    const seen = { created: false, events: [] };
    const stream = devices.Watch({ start_revision: hb.revision, prefix });
    stream.on('data', (res) => {
      seen.created = seen.created || res.created;
      for (const ev of res.events) {
        seen.events.push({ revision: ev.revision, device_id: ev.device_id, kinds: ev.kinds });
      }
      if (seen.events.length > 0) {
        stream.cancel();
        resolve(seen);
      }
    });
    stream.on('error', (err) => (err.code === grpc.status.CANCELLED ? null : reject(err)));
  });

  const status = await call(cluster, 'Status', {});
  out.status = { node_id: status.node_id, role: status.role, members: status.members.length };

  try {
    await call(devices, 'Heartbeat', { device_id: id, seq: '0' });
    out.error = null;
  } catch (err) {
    out.error = { code: err.code, details: err.details, status: decodeDetails(err.metadata) };
  }

  out.reflection = await new Promise((resolve, reject) => {
    const client = new reflection.grpc.reflection.v1alpha.ServerReflection(endpoint, creds);
    const stream = client.ServerReflectionInfo();
    stream.on('data', (res) => {
      resolve(res.list_services_response.service.map((s) => s.name).sort());
      stream.end();
    });
    stream.on('error', reject);
    stream.write({ list_services: '' });
  });
  console.log(JSON.stringify(out));
  devices.close();
  cluster.close();
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
