#!/usr/bin/env bash
# Rebuild the committed artifacts <Name>.json = {"abi": [...], "bytecode": "0x..."}.
# Needs solc-js 0.8.28 (npm package `solc`); tests and the demo never run this.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
solcjs="${SOLCJS:-$here/../../../../.tools/node_modules/.bin/solcjs}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cd "$here"
"$solcjs" --bin --abi --optimize -o "$out" Token.sol Silent.sol Router.sol
for name in Token Silent Router; do
    python3 - "$out/${name}_sol_${name}" "$here/$name.json" <<'PY'
import json, sys
stem, dest = sys.argv[1], sys.argv[2]
with open(stem + ".abi") as f:
    abi = json.load(f)
with open(stem + ".bin") as f:
    bytecode = "0x" + f.read().strip()
with open(dest, "w") as f:
    json.dump({"abi": abi, "bytecode": bytecode}, f, indent=1, sort_keys=True)
    f.write("\n")
PY
done
