# The alignment rows of BENCHMARKS.md: DPO and PPO on the TinyLlama-1.1B shape, one GPU, random
# weights through the recipes' own jitted pieces (llama_jax/bench/dpo.py, llama_jax/bench/ppo.py).
# Run from the repository root: bash benchmarks/gpu_align.sh
source benchmarks/gpu_setup.sh
set -x
# DPO: 8 pairs x 1024 tokens (16 sequences) a step; the policy's forward+backward and the frozen
# reference's forward are both counted in the MFU.
python -m llama_jax.bench dpo --config configs/dpo_tinyllama_1b.py --warmup 3 --steps 10
python -m llama_jax.bench dpo --config configs/dpo_tinyllama_1b.py --warmup 3 --steps 10 --config.batch_size=16
python -m llama_jax.bench dpo --config configs/dpo_tinyllama_1b.py --warmup 3 --steps 10 --config.model.remat_policy=dots_no_batch --config.batch_size=16
# PPO: 64 prompts of 256 tokens, 256 new tokens each; rollout (generation engine), scoring, one
# update (a minibatch of 32 rows x 512 tokens), and whole steps (4 epochs x 2 minibatches).
python -m llama_jax.bench ppo --config configs/ppo_tinyllama_1b.py --steps 3
python -m llama_jax.bench ppo --config configs/ppo_tinyllama_1b.py --steps 3 --config.batch_size=128 --config.ppo.minibatches=4
