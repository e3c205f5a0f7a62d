"""Fine-tune (or linearly probe) an ACE encoder for image classification or semantic segmentation.

    python examples/finetune.py --model_name_or_path outputs/ace-pretrain --train_dir my_xrays   # class folders
    python examples/finetune.py --model_name_or_path org/ace-vit-b --train_csv train.csv --multi_label \
        --label_columns effusion,nodule --freeze_encoder --learning_rate 1e-3                    # linear probe
    accelerate launch examples/finetune.py --task segmentation --model_name_or_path org/ace-vit-b \
        --train_csv masks.csv --train_fraction 0.1                                                # 10% of labels

Every field of `ace_hf.finetuning.FinetuningArguments` is an option (`--help` lists them); a single .json or
.yaml file of those fields works too. The loop itself is `ace_hf.finetuning.finetune`.
"""

from ace_hf.finetuning import main

if __name__ == "__main__":
    main()
