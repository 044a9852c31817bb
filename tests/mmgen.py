"""Generate a tiny multimodal severity dataset (image + sensor window + env features) as a CSV.

Every modality carries the class on its own, so each ablation of the FiLM model can learn it:
the image's brightness, the sensor window's amplitude and the env temperature all grow with the
severity class (plus noise). Half of the env cells are inline JSON, half ``.json`` files, so both
packer paths are used. The CSV is what a user gives ``ddp-shards pack --extras sensor,env``.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
from PIL import Image

CLASSES = ("none", "low", "medium", "high")  # 4 severity classes
SENSOR_SHAPE = (2, 32)  # channels x time steps


def make_multimodal_csv(root: str, per_class: int = 12, size: int = 16, seed: int = 0,
                        bad_sensor_rows: int = 0) -> str:
    """Write images, ``.npy`` windows, env ``.json`` files and ``root/samples.csv``; return the
    CSV path. ``bad_sensor_rows`` extra rows get a window of the wrong shape (packer problems)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "files"), exist_ok=True)
    t = np.linspace(0, 4 * np.pi, SENSOR_SHAPE[1], dtype=np.float32)
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(per_class):
            name = f"{label}_{i:03d}"
            level = 40 + 60 * c + rng.integers(-15, 16)
            pixels = np.clip(rng.normal(level, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, "files", name + ".png"))
            window = np.stack([(0.5 + c) * np.sin(t + rng.uniform(0, 6)),
                               (0.5 + c) * np.cos(2 * t)]) + rng.normal(0, 0.2, SENSOR_SHAPE)
            np.save(os.path.join(root, "files", name + ".npy"), window.astype(np.float32))
            env = {"temp_c": round(20 + 6 * c + float(rng.normal(0, 1.5)), 3),
                   "humidity": round(float(rng.uniform(0.2, 0.8)), 3)}
            if i % 2:
                with open(os.path.join(root, "files", name + ".json"), "w") as f:
                    json.dump(env, f)
                env_cell = f"files/{name}.json"
            else:
                env_cell = json.dumps(env)
            rows.append([f"files/{name}.png", label, f"files/{name}.npy", env_cell])
    for i in range(bad_sensor_rows):
        name = f"bad_{i:03d}"
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(
            os.path.join(root, "files", name + ".png"))
        np.save(os.path.join(root, "files", name + ".npy"), np.zeros((3, 7), np.float32))
        rows.append([f"files/{name}.png", CLASSES[0], f"files/{name}.npy", '{"temp_c": 1, '
                     '"humidity": 0.5}'])
    path = os.path.join(root, "samples.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "sensor", "env"])
        writer.writerows(rows)
    return path
