# Sourced at the start of every device command: the packages the GPU image lacks, carried as wheels
# (run() with carry=[".whl"]), fetched on a machine with the registries:
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl fastapi starlette \
#     pydantic pydantic_core annotated_types typing_extensions typing_inspection uvicorn uvloop \
#     httptools ml_collections tensorboardx opentelemetry_api
# Once a machine, under a lock: sections run side by side on several GPUs (gpu.sh's GPUS) must not
# install at once.
(
  flock 9
  [ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.installed; }
) 9>/tmp/gpu_setup.lock
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
