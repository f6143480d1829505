// One GET with undici's fetch through its EnvHttpProxyAgent (what Node >= 24 uses for
// HTTP_PROXY/HTTPS_PROXY with NODE_USE_ENV_PROXY=1), for tests/clients_e2e.rs.
//
//   UNDICI=/path/to/node_modules/undici node undici_fetch.js URL
//
// Prints `status N reason=R` and the body, exit 0 for 2xx and 2 otherwise; on an error,
// `error NAME CODE MESSAGE` for the error and each of its causes ("fetch failed" wraps what
// went wrong), exit 1.
const { fetch, EnvHttpProxyAgent } = require(process.env.UNDICI)

const dispatcher = new EnvHttpProxyAgent()
fetch(process.argv[2], { dispatcher, signal: AbortSignal.timeout(10000) }).then(
  async (r) => {
    console.log(`status ${r.status} reason=${r.headers.get('x-portcullis-reason') || '-'}`)
    console.log(await r.text())
    process.exit(r.ok ? 0 : 2)
  },
  (e) => {
    for (let c = e; c; c = c.cause) console.log(`error ${c.name} ${c.code} ${c.message}`)
    process.exit(1)
  }
)
