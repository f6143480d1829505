#!/usr/bin/env python3
"""One GET with Python's urllib or requests, as an agent would make it (proxy from the
environment, CA from SSL_CERT_FILE / REQUESTS_CA_BUNDLE), for tests/clients_e2e.rs.

  fetch.py urllib|requests URL

Prints `status N reason=R` (R: the X-Portcullis-Reason header, or -) and the body; on an
exception, its text. Exit 0 for a 2xx answer, 2 for another status, 1 for an exception.
"""
import sys


def main(lib, url):
    if lib == "urllib":
        import urllib.error
        import urllib.request
        try:
            r = urllib.request.urlopen(url, timeout=10)
            status, headers, body = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, headers, body = e.code, e.headers, e.read()
        except Exception as e:  # noqa: BLE001: the client's own words are the point
            print(f"error {e!r}")
            return 1
    else:
        import requests
        try:
            r = requests.get(url, timeout=10)
            status, headers, body = r.status_code, r.headers, r.content
        except Exception as e:  # noqa: BLE001
            print(f"error {e!r}")
            return 1
    print(f"status {status} reason={headers.get('X-Portcullis-Reason', '-')}")
    print(body.decode(errors="replace"))
    return 0 if 200 <= status < 300 else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
