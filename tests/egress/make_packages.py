"""Builds the packages the egress tests install through the proxy, from
nothing but the standard library: a pure-Python wheel under a PEP 503
simple index, and an npm package with its registry document.

    python3 make_packages.py OUT_DIR NPM_BASE_URL

OUT_DIR/pypi/simple/airlock-probe/index.html and OUT_DIR/pypi/packages/*.whl
are served as static files; OUT_DIR/npm/doc.json is the registry's answer
to GET /airlock-probe, and OUT_DIR/npm/airlock-probe/-/airlock-probe-1.0.0.tgz
its tarball (NPM_BASE_URL is where the registry is reached from the sandbox).
"""

import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import zipfile

out, npm_base = sys.argv[1], sys.argv[2].rstrip("/")

# The wheel: one module, and the metadata pip requires.
wheel_name = "airlock_probe-1.0-py3-none-any.whl"
files = {
    "airlock_probe/__init__.py": b"MESSAGE = 'installed through the airlock egress proxy'\n",
    "airlock_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: airlock-probe\nVersion: 1.0\n",
    "airlock_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: airlock-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(data)}")
record.append("airlock_probe-1.0.dist-info/RECORD,,")
files["airlock_probe-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
buffer = io.BytesIO()
with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as wheel:
    for name, data in files.items():
        wheel.writestr(name, data)
wheel_bytes = buffer.getvalue()
os.makedirs(f"{out}/pypi/packages", exist_ok=True)
os.makedirs(f"{out}/pypi/simple/airlock-probe", exist_ok=True)
with open(f"{out}/pypi/packages/{wheel_name}", "wb") as f:
    f.write(wheel_bytes)
sha = hashlib.sha256(wheel_bytes).hexdigest()
with open(f"{out}/pypi/simple/airlock-probe/index.html", "w") as f:
    f.write(f'<!DOCTYPE html><html><body><a href="../../packages/{wheel_name}#sha256={sha}">{wheel_name}</a></body></html>\n')

# The npm package: package/package.json and package/index.js in a gzipped tar.
package = {"name": "airlock-probe", "version": "1.0.0", "main": "index.js"}
members = {
    "package/package.json": json.dumps(package).encode(),
    "package/index.js": b"module.exports = 'installed through the airlock egress proxy';\n",
}
buffer = io.BytesIO()
with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, data in members.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
tarball = buffer.getvalue()
os.makedirs(f"{out}/npm/airlock-probe/-", exist_ok=True)
with open(f"{out}/npm/airlock-probe/-/airlock-probe-1.0.0.tgz", "wb") as f:
    f.write(tarball)
integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
doc = {
    "name": "airlock-probe",
    "dist-tags": {"latest": "1.0.0"},
    "versions": {
        "1.0.0": dict(
            package,
            dist={
                "tarball": f"{npm_base}/airlock-probe/-/airlock-probe-1.0.0.tgz",
                "shasum": hashlib.sha1(tarball).hexdigest(),
                "integrity": integrity,
            },
        )
    },
}
with open(f"{out}/npm/doc.json", "w") as f:
    json.dump(doc, f)
