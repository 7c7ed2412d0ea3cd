"""A/B driver: bench.prefix.prefix_sharing (model alone) as make bench runs it, 16 images, batch 8, 16 tokens."""
import json, sys, tempfile
from pathlib import Path
import torch
from bench.model import load_images, write_workloads
from bench.prefix import prefix_sharing
from producer.schema import GenerationSettings
from producer.settings import Settings
from worker.dev.tiny_model import build_tiny_model
from worker.model import VQAModel
import worker.model
print("code:", worker.model.__file__, flush=True)
with tempfile.TemporaryDirectory() as tmp:
    d = build_tiny_model(Path(tmp) / "m", size="bench")
    loads = write_workloads(Path(tmp) / "i", uniform=16, mixed=0)
    images = load_images(Path(tmp) / "i", loads["uniform"].files)
    model = VQAModel.load(Settings(model=str(d), quantization="none", device="cpu"))
    gen = GenerationSettings(max_new_tokens=16, min_new_tokens=16)
    rows = prefix_sharing(model, images, per_image=tuple(int(x) for x in sys.argv[1].split(",")), batch=8, rounds=3, generation=gen)
    for r in rows:
        print(json.dumps({k: r[k] for k in ("questions_per_image", "qps_without", "qps_with", "speedup", "speedup_per_round", "decode_share_without", "speedup_one_token", "speedup_expected_from_prefill", "answers_agreeing")}), flush=True)
