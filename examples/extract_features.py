"""Extract ACE embeddings for an image file or a folder of images: a global vector and a patch map per image.

    python examples/extract_features.py --model_name_or_path org/ace-vit-b --input xrays/ --output features/
    python examples/extract_features.py ... --size 512x640 --resize_mode pad   # another input size
    python examples/extract_features.py extract.yaml   # the same arguments from a .json or .yaml file

Every field of `ace_hf.commands.extract_features.FeatureExtractionArguments` is an option (--format npy|safetensors,
--batch_size, --device, ...); see `ace_hf.commands.extract_features` for the output layout.
"""

import sys

from ace_hf.commands.extract_features import main

if __name__ == "__main__":
    sys.exit(main())
