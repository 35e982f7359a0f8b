#!/usr/bin/env bash
# Set up mvm on a fresh Debian/Ubuntu host, then run the seed example live.
#   ./setup.sh            everything, then the example
#   ./setup.sh --no-example
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")"

run_example=1
[ "${1:-}" = "--no-example" ] && run_example=0

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# 1. System packages: QEMU (microVM backend), bubblewrap (namespace backend), the
#    template builder, busybox for the VM's initramfs, passt for opt-in networking;
#    skopeo/umoci/buildah for templates from OCI images and Dockerfiles, docker-registry
#    and musl for their tests (a local registry, an Alpine-like image).
packages=(qemu-system-x86 qemu-utils bubblewrap busybox-static mmdebstrap passt e2fsprogs cpio
          xz-utils zstd lz4 python3 python3-venv ca-certificates fuse-overlayfs
          skopeo umoci buildah docker-registry musl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node (for the TypeScript SDK): Debian's, unless a node with npm is already installed.
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  # docker-registry is only a test tool here (tests start their own on 127.0.0.1): do not
  # leave the system service it installs listening on :5000.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi

# 2. The Python environment (pinned dependencies from pyproject.toml).
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
if ! .venv/bin/python -c "import mvm, pytest, hypothesis" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.mvm-installed ]; then
  say "installing mvm and its pinned dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test]"
  touch .venv/.mvm-installed
fi

# 3. The TypeScript SDK's dependencies (from its lockfile), when present.
if [ -f sdks/typescript/package-lock.json ] && [ ! -d sdks/typescript/node_modules ]; then
  say "installing the TypeScript SDK's dependencies"
  (cd sdks/typescript && npm ci --no-audit --no-fund --silent)
fi

# 4. The default template (built once, cached by content hash) and a health report.
say "building the default template (python-3.13) — cached after the first time"
.venv/bin/mvmctl template build python-3.13
say "building the framework adapters' template (eval-tools: python-3.13 + adduser/passwd/procps)"
.venv/bin/mvmctl template build src/mvm/integrations/eval-tools.toml
.venv/bin/mvmctl doctor

# 5. The main job: the seed's example, live, then every cookbook operation with its output.
if [ "$run_example" = 1 ]; then
  if [ -z "${MVM_SECRET_API_KEY:-}" ] && ! .venv/bin/mvmctl secret ls --json | grep -q '"api-key"'; then
    say "the seed example reads secret 'api-key': storing a random demo value (replace: mvmctl secret set api-key)"
    head -c 24 /dev/urandom | base64 | .venv/bin/mvmctl secret set api-key >/dev/null
  fi
  say "running the seed example live: mvmctl run --mode live examples/seed_example.py"
  .venv/bin/mvmctl run --mode live examples/seed_example.py
  say "every cookbook operation, live: examples/cookbook_tour.py"
  .venv/bin/python examples/cookbook_tour.py
fi
