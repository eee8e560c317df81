"""Scan a small CNN with planted dead channels and save the report.

    python examples/scan_planted.py [OUT.json]
"""

import sys

import torch
from torch import nn

import deadrelu

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    nn.Linear(32, 10),
)  # fmt: skip
with torch.no_grad():
    model[1].bias[[3, 7]] = -50.0  # BatchNorm shift drives channels 3 and 7 below zero
    model[3].bias[:4] = -50.0  # and the first four channels of the second conv

images = torch.randn(500, 3, 16, 16)
report = deadrelu.scan(model, images, batch_size=100)
print(report)
for site in report.sites:
    print(f"{site.name}: dead channels {list(site.dead_units)}")
if len(sys.argv) > 1:
    report.to_json(sys.argv[1])
    print(f"report written to {sys.argv[1]}")
