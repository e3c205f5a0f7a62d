"""Evaluate ACE encoders on held-out chest radiographs: anatomical consistency, few-shot segmentation and
findings classification. Writes `results.json` and `results.md` to --output_dir.

    python examples/run_evaluation.py --model_name_or_path outputs/ace-pretrain --random_init
    python examples/run_evaluation.py --model_name_or_path org/ace-vit-b outputs/my-run --names hub mine

Every field of `ace_hf.evaluation.config.EvaluationConfig` is an option (--num_anatomy_images,
--segmentation_shots 1 5 20, --finetune_steps 0 to skip fine-tuning, ...); the options and what they do are in
`ace_hf.evaluation.cli`, which this script runs.
"""

from ace_hf.evaluation.cli import main

if __name__ == "__main__":
    main()
