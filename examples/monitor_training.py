"""Watch units die during training with deadrelu.Monitor: history, lifecycle events, warnings, a JSONL log.

    python examples/monitor_training.py            # writes monitor_health.jsonl in the current folder

The learning rate is deliberately too large, so units die under training; the monitor
warns (naming the layer and suggesting a lower learning rate, clipping, a leaky
activation or re-initialisation) and records when each unit died.
"""

import json
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import deadrelu
from deadrelu.monitor.monitor import DeadUnitWarning

torch.manual_seed(0)
x = torch.randn(2048, 20)
y = (x[:, :5].sum(1, keepdim=True) > 0).float()
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=5.0)  # deliberately too large

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", DeadUnitWarning)
    with deadrelu.Monitor(model, window=16, log_every=16, sinks=["monitor_health.jsonl"]) as mon:
        for epoch in range(3):
            for xb, yb in zip(x.split(64), y.split(64)):
                loss = F.binary_cross_entropy_with_logits(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                mon.step(loss)  # the loss stays on its device until the monitor evaluates

steps, dead = mon.history.series("3", "dead")
print("dead fraction of layer '3' by step:", ", ".join(f"{s}: {d:.2f}" for s, d in zip(steps, dead)))
print(mon.events_summary())
for w in caught:
    print("warning:", str(w.message)[:160], "...")
print(mon.report("window"))
with open("monitor_health.jsonl") as fh:
    lines = [json.loads(line) for line in fh]
print(f"monitor_health.jsonl: {len(lines)} records, last at step {lines[-1]['step']}")
