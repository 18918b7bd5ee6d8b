#!/usr/bin/env bash
# `make image-test`: build docker/Dockerfile and smoke-test the image without a container engine
# or a registry (root; buildah, podman and debootstrap from apt).
#  1. base: a minimal Debian bookworm from debootstrap, imported into podman (kept between runs);
#  2. build: buildah bud --isolation chroot on that base (the llama.cpp build: ~10+ min on 2 cores);
#  3. run: the image is mounted and its CMD run in a chroot as its non-root user, with the image's
#     own environment (podman run needs rlimits this sandbox refuses); then:
#     - without a key it must refuse to start (it listens on 0.0.0.0);
#     - with LOGPROBS_API_KEY_FILE: the image's HEALTHCHECK command passes, an echo request with
#       the key returns logprobs, one without it gets 401.
# IMAGE_TEST_DIR (default /var/tmp/logprobs-image-test) holds the base rootfs; nothing goes in git.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${IMAGE_TEST_DIR:-/var/tmp/logprobs-image-test}
BASE=${BASE_IMAGE:-localhost/debian-bookworm-minbase}
IMAGE=${IMAGE:-localhost/logprobs-server:test}
DOCKERFILE=${DOCKERFILE:-docker/Dockerfile}
MODELS=${MODELS:-$HOME/.cache/logprobs-server}
BUILD_ARGS=${BUILD_ARGS:-}  # more buildah bud arguments, e.g. --build-arg CUDA_ARCHITECTURES=90
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PORT=${PORT:-18080}
KEY=sk-image-test-key
say() { echo "image-test: $*"; }

for tool in buildah podman debootstrap curl; do
    command -v $tool >/dev/null || { echo "image-test: needs $tool (apt-get install buildah podman debootstrap curl)"; exit 2; }
done
[ -f "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" ] || { echo "image-test: no default model in $MODELS (run make serve once)"; exit 2; }
mkdir -p "$WORK"

if ! podman image exists "$BASE"; then
    say "base image $BASE: debootstrap bookworm (minbase)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE"
    rm -rf "$WORK/rootfs"
fi

say "build $IMAGE from $DOCKERFILE on $BASE"
start=$(date +%s)
# A TLS-intercepting egress proxy (as in this project's sandbox) needs its CA in the build's pip:
# this machine's CA bundle and a pip.conf naming it are mounted into the RUN steps, not baked in.
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
printf '[global]\ncert = /etc/ssl/certs/build-host-ca.crt\n' > "$WORK/pip.conf"
(cd "$ROOT" && buildah bud --isolation chroot --format docker --layers --force-rm --build-arg "BASE_IMAGE=$BASE" \
    --volume "$CA_BUNDLE:/etc/ssl/certs/build-host-ca.crt:ro" --volume "$WORK/pip.conf:/etc/pip.conf:ro" \
    $BUILD_ARGS -f "$DOCKERFILE" -t "$IMAGE" .)
say "built in $(( $(date +%s) - start )) s; $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) bytes"

MNT=$(podman image mount "$IMAGE")
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
    for m in "$MNT/models" "$MNT/tmp" "$MNT/dev" "$MNT/proc"; do
        mountpoint -q "$m" && umount -l "$m" || true
    done
    podman image unmount "$IMAGE" >/dev/null || true
}
trap cleanup EXIT
mount -t proc proc "$MNT/proc"
mount --bind /dev "$MNT/dev"
mount -t tmpfs tmpfs "$MNT/tmp"
SECRET=/tmp/api-key  # on the tmpfs (the image mount is read-only); Docker would mount a secret at /run/secrets
echo "$KEY" > "$MNT$SECRET"
chmod 0644 "$MNT$SECRET"
mount --bind -o ro "$MODELS" "$MNT/models"

# A CUDA build: llama.cpp's CUDA library is there and finds every library it links to (cudart and
# cuBLAS from the image; the driver's libcuda is not linked, the container runtime brings it).
CUDA_LIB=$(ls "$MNT"/opt/venv/lib/python3*/site-packages/llama_cpp/lib/libggml-cuda.so 2>/dev/null || true)
if [ -n "$CUDA_LIB" ]; then
    chroot "$MNT" ldd "${CUDA_LIB#"$MNT"}" | grep -E "cudart|cublas|not found" | sed 's/^/image-test: ldd: /'
    if chroot "$MNT" ldd "${CUDA_LIB#"$MNT"}" | grep -q "not found"; then say "FAIL: a library of the CUDA build is missing"; exit 1; fi
    say "CUDA build: $(basename "$CUDA_LIB") links; no GPU here, so the server below runs on the CPU"
fi

# The image's own configuration: environment, user, command, health check.
mapfile -t ENVS < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
USER_SPEC=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
CMD=$(podman image inspect --format '{{join .Config.Cmd " "}}' "$IMAGE")
HEALTH=$(podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$IMAGE")
say "user=$USER_SPEC cmd=$CMD healthcheck=$HEALTH"
UID_GID=$(chroot "$MNT" id -u "$USER_SPEC"):$(chroot "$MNT" id -g "$USER_SPEC")
in_image() {  # exec (call it in a subshell) a command in the image as its user, with its environment, VAR=VALUE args first
    local extra=()
    while [[ $# -gt 0 && "$1" == *=* ]]; do extra+=("$1"); shift; done
    exec chroot --userspec="$UID_GID" "$MNT" /usr/bin/env -i HOME=/home/logprobs "${ENVS[@]}" LOGPROBS_PORT=$PORT "${extra[@]}" "$@"
}

say "1. no key: the server must refuse to start on 0.0.0.0"
if out=$(in_image $CMD 2>&1); then
    echo "$out"; say "FAIL: started without a key"; exit 1
fi
echo "$out" | tail -1
echo "$out" | grep -q "no API key is set" || { say "FAIL: unexpected refusal"; exit 1; }

say "2. key from LOGPROBS_API_KEY_FILE=$SECRET"
(in_image LOGPROBS_API_KEY_FILE=$SECRET LOGPROBS_N_CTX=2048 $CMD) >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 240); do
    curl -fs "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER_PID 2>/dev/null || { cat "$WORK/server.log"; say "FAIL: server exited"; exit 1; }
    sleep 0.5
done
curl -fsS "http://127.0.0.1:$PORT/health"; echo
HEALTH_CMD=$(python3 -c 'import json,sys,shlex; t=json.loads(sys.argv[1]); print(shlex.join(t[1:]) if t[0]=="CMD" else t[1])' "$HEALTH")
(in_image bash -c "$HEALTH_CMD") && say "HEALTHCHECK command: healthy"
BODY='{"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "The capital of France is Paris", "max_tokens": 0, "echo": true, "logprobs": 1}'
code=$(curl -s -o "$WORK/no-key.json" -w '%{http_code}' -H 'Content-Type: application/json' -d "$BODY" \
    "http://127.0.0.1:$PORT/v1/completions")
say "without the key: HTTP $code"; [ "$code" = 401 ] || { say "FAIL: expected 401"; exit 1; }
curl -fsS -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d "$BODY" \
    "http://127.0.0.1:$PORT/v1/completions" > "$WORK/echo.json"
python3 - "$WORK/echo.json" <<'EOF'
import json, sys
choice = json.load(open(sys.argv[1]))["choices"][0]
lp = choice["logprobs"]
assert lp["token_logprobs"][0] is None and all(isinstance(x, float) for x in lp["token_logprobs"][1:]), lp
print("image-test: echo with the key:", list(zip(lp["tokens"], [None if x is None else round(x, 4) for x in lp["token_logprobs"]])))
EOF
ps -o user=,pid=,cmd= -p $SERVER_PID | sed 's/^/image-test: server process: /'  # the image's user, not root
grep -E "Serving|warning|error" "$WORK/server.log" | sed 's/^/image-test: server log: /' | head -5
say "PASS"
