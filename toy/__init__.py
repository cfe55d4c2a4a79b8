"""The toy world: 64-px pictures of one or two flat coloured shapes, a model built from scratch to
draw them, and an analytic evaluator that scores a picture against its prompt, so that the whole of
CoMat runs and can be measured on a laptop CPU.

This package imports the product (unet, vae, sample, captioner, segment, train, ...); the product
never imports it. What the product needs of the toy is data: the model folder toy/model, whose
comat.json is its training preset (captioner, segmenter, run sizes), like any model folder's.
  world.py   rendering, the prompt grammar, the evaluator, evaluation and validation prompts
  build.py   builds toy/model from nothing (python -m toy.build)
  eval.py    scores a model or a fine-tune on the evaluation prompts (python -m toy.eval)
  bench/     the toy world's experiments (python -m toy.bench.ablation, ...)
  data/      the toy's prompts in T2I-CompBench's layout (evaluate.py --data toy/data)
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "model")            # the shipped base model (diffusers layout)
CAPTIONER = os.path.join(MODEL, "captioner")   # its BLIP captioner: concept matching's reward
# the captioner fine-tuned to read shapes where the generator reaches (toy.build's bind stage):
# the binding runs' reward, train.py --captioner toy/model/captioner_bind (docs/toy-world.md)
CAPTIONER_BIND = os.path.join(MODEL, "captioner_bind")
# a captioner built to read relations too (toy.build's rel stage): the spatial runs' reward
CAPTIONER_REL = os.path.join(MODEL, "captioner_rel")
VQA = os.path.join(MODEL, "vqa")               # its BLIP-VQA: T2I-CompBench's colour scorer
DATA = os.path.join(HERE, "data")              # its prompts in T2I-CompBench's layout
