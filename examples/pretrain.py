"""Pretrain an ACE encoder with Accelerate, then export (and optionally push) the teacher encoder.

    accelerate launch examples/pretrain.py                      # tiny preset on the built-in chest DRRs (CPU ok)
    accelerate launch examples/pretrain.py --train_dir my_xrays --model_preset ace-vit-b --mixed_precision bf16
    accelerate launch --num_processes 8 examples/pretrain.py --dataset_name org/cxr --model_preset ace-swin-b

The same as `ace-hf pretrain` (and `accelerate launch -m ace_hf pretrain`): the loop is
`ace_hf.pretraining.pretrain`; `--help` lists every argument.
"""

from ace_hf.pretraining.cli import main

if __name__ == "__main__":
    main()
