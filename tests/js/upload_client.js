// Drives tus-js-client (Node.js build) against a running tusd-py for
// tests/test_ietf_js_client.py.
//
// Usage: node upload_client.js '<json options>'
//   endpoint, file, protocol ('tus-v1' | 'ietf-draft-03' | 'ietf-draft-05'),
//   chunkSize (bytes, default: whole file), cutAt (upload offset at which the
//   connection of the request carrying that byte is cut mid-body; the upload is then
//   resumed from its URL with a new Upload), uploadDataDuringCreation,
//   uploadLengthDeferred, headers (sent with every request, e.g. Authorization).
// Prints one JSON line:
//   { url, exchanges: [{ phase, method, status, request, response, milliseconds }] }
// (milliseconds: from the request being sent to its response's head).
// Any error exits with status 1 and the error on stderr.
'use strict'

const fs = require('node:fs')
const http = require('node:http')
const tus = require('tus-js-client')

const REQUEST_HEADERS = [
  'Content-Type',
  'Tus-Resumable',
  'Upload-Complete',
  'Upload-Draft-Interop-Version',
  'Upload-Length',
  'Upload-Offset',
]
const RESPONSE_HEADERS = ['Location', 'Tus-Resumable', 'Upload-Complete', 'Upload-Length', 'Upload-Offset']

const config = JSON.parse(process.argv[2])
const data = fs.readFileSync(config.file)
const exchanges = []
const sentAt = new WeakMap()

function pick(source, names) {
  const picked = {}
  for (const name of names) {
    const value = source.getHeader(name)
    if (value !== undefined && value !== null) picked[name.toLowerCase()] = String(value)
  }
  return picked
}

function options(phase, extra) {
  return {
    endpoint: config.endpoint,
    protocol: config.protocol,
    chunkSize: config.chunkSize || Number.POSITIVE_INFINITY,
    uploadDataDuringCreation: Boolean(config.uploadDataDuringCreation),
    uploadLengthDeferred: Boolean(config.uploadLengthDeferred),
    // No automatic retries: every failure must reach the test.
    retryDelays: null,
    metadata: { filename: 'data.bin', filetype: 'application/octet-stream' },
    headers: config.headers || {},
    onBeforeRequest(req) {
      sentAt.set(req, performance.now())
    },
    onAfterResponse(req, res) {
      exchanges.push({
        phase,
        method: req.getMethod(),
        status: res.getStatus(),
        request: pick(req, REQUEST_HEADERS),
        response: pick(res, RESPONSE_HEADERS),
        milliseconds: performance.now() - sentAt.get(req),
      })
    },
    ...extra,
  }
}

// An HTTP stack that behaves like tus-js-client's own, except that the one request
// whose body contains upload offset `cutAt` sends the bytes before it, waits until
// they are handed to the kernel, and then closes the connection: a connection lost
// mid-body, at an exact byte. The server must keep every one of those bytes.
class CuttingStack {
  constructor(cutAt) {
    this.inner = new tus.DefaultHttpStack()
    this.cutAt = cutAt
    this.done = false
  }

  createRequest(method, url) {
    return new CuttingRequest(this, method, url)
  }

  getName() {
    return 'CuttingStack'
  }
}

class CuttingRequest {
  constructor(stack, method, url) {
    this.stack = stack
    this.method = method
    this.url = url
    this.headers = {}
    this.progressHandler = () => {}
    this.inner = null
  }

  getMethod() {
    return this.method
  }

  getURL() {
    return this.url
  }

  setHeader(name, value) {
    this.headers[name] = value
  }

  getHeader(name) {
    return this.headers[name]
  }

  setProgressHandler(handler) {
    this.progressHandler = handler
  }

  send(body = null) {
    const offset = Number(this.headers['Upload-Offset'] || 0)
    const cut = this.stack.cutAt - offset
    if (this.stack.done || !body || cut <= 0 || cut >= body.length) {
      this.inner = this.stack.inner.createRequest(this.method, this.url)
      for (const [name, value] of Object.entries(this.headers)) this.inner.setHeader(name, value)
      this.inner.setProgressHandler(this.progressHandler)
      return this.inner.send(body)
    }
    this.stack.done = true
    return new Promise((_resolve, reject) => {
      // Like the default stack for a Buffer: no Content-Length, so a chunked body.
      const request = http.request(this.url, { method: this.method, headers: this.headers })
      request.on('error', () => reject(new Error(`connection cut after ${cut} body bytes`)))
      request.on('response', () => reject(new Error('the server answered a cut-off request')))
      request.write(body.subarray(0, cut), () => request.destroy())
    })
  }

  abort() {
    return this.inner ? this.inner.abort() : Promise.resolve()
  }

  getUnderlyingObject() {
    return this.inner ? this.inner.getUnderlyingObject() : null
  }
}

// Upload until the connection is cut at `cutAt`; resolves with the upload URL.
function uploadUntilCut() {
  return new Promise((resolve, reject) => {
    const upload = new tus.Upload(
      data,
      options('first', {
        httpStack: new CuttingStack(config.cutAt),
        onSuccess() {
          reject(new Error(`upload finished although the connection was to be cut at ${config.cutAt}`))
        },
        onError(error) {
          if (upload.url && /connection cut/.test(String(error))) resolve(upload.url)
          else reject(error)
        },
      }),
    )
    upload.start()
  })
}

function uploadToEnd(phase, extra) {
  return new Promise((resolve, reject) => {
    const upload = new tus.Upload(
      data,
      options(phase, {
        ...extra,
        onSuccess() {
          resolve(upload.url)
        },
        onError: reject,
      }),
    )
    upload.start()
  })
}

async function main() {
  let url
  if (config.cutAt) {
    const cutUrl = await uploadUntilCut()
    url = await uploadToEnd('resume', { uploadUrl: cutUrl })
  } else {
    url = await uploadToEnd('first', {})
  }
  process.stdout.write(`${JSON.stringify({ url, exchanges })}\n`)
}

main().catch((error) => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`)
  process.exit(1)
})
