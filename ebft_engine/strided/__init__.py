"""Strided mode: anchors inside documents, n samples of every block generated at once, one
process and no server (engine-math.md).

    layout.py    anchors, blocks, step-major slots, position ids, the predicting-position index map
    mask.py      the block-parallel attention mask (dense and flex forms) and the masked forward
    generate.py  KV-cached block-parallel sampling (and the naive reference generator)
    loss.py      chunked lm_head log-probs, the policy-gradient and CE losses
    step.py      StridedStepper: one rollout-score-loss step composed from the above

May import: torch, and the engine's shared modules (config, features, rewards, advantages,
stepper). Never structured/, rollout/, train.py or ebft_tui.
"""
