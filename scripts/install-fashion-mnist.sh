#!/bin/sh
# Fashion-MNIST for mtil-mini v2's "fashion" task: Debian's dataset-fashion-mnist package (60k/10k
# idx files under /usr/share/datasets/fashion-mnist). Called by `make`; never fails the build: where
# apt cannot install it (no root, no sudo, no apt, no mirror), it says so and mtil-mini v2 runs its
# other five tasks (with a warning at run time).
DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}  # overridable for testing this script
if ls "$DIR"/t10k-images-idx3* >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=env; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n env"; else SUDO=none; fi
if [ "$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Fashion-MNIST (apt-get install dataset-fashion-mnist) for mtil-mini v2"
    SUDO="$SUDO DEBIAN_FRONTEND=noninteractive"  # sudo drops the caller's environment
    $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq >/dev/null 2>&1 \
             && $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1; }
fi
if ls "$DIR"/t10k-images-idx3* >/dev/null 2>&1; then
    exit 0
fi
cat >&2 <<MSG
NOTE: Fashion-MNIST is not installed and could not be installed here (needs apt-get and root or
      passwordless sudo). mtil-mini v2 will run five of its six tasks (no "fashion") and warn; its
      numbers then differ from docs/results.md. To add it: sudo apt-get install dataset-fashion-mnist
      (or, where make may use sudo later: make fashion-mnist)
MSG
exit 0
