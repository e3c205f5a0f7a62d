"""The evaluation suite: does an encoder give the same anatomy the same embedding, and does that help downstream?

One job per module, imported from where it lives (this package imports none of them, so that the report,
which `ace_hf.hub` needs for model cards, loads neither the renderer nor the suite):

- `config`: `EvaluationConfig`, what the suite renders and runs;
- `heldout`: held-out radiographs as tensors (`load_heldout`) and their frozen embeddings (`encode`);
- `properties`: anatomical matching, landmark matching and view correspondence on frozen embeddings;
- `fewshot`: few-shot segmentation and findings classification through one loop;
- `baseline`: `PixelEncoder`, the pixels themselves as an encoder: the suite's non-learned column;
- `suite`: `evaluate_encoder`, all of the above on one encoder;
- `report`: the results as one Markdown table (`results_markdown`);
- `arguments`: `EvaluationArguments`, which encoders and baselines, where the results go;
- `run`: `run_evaluation`, the suite on every encoder with the same crops and draws;
- `cli`: `ace-hf evaluate` (`main`).

Training-side package: never imported by the files that travel to the Hub.
"""
