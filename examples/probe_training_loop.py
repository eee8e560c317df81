"""Use deadrelu.Probe in your own training loop and see which units die between epochs.

    python examples/probe_training_loop.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import deadrelu

torch.manual_seed(0)
x = torch.randn(1024, 20)
y = (x[:, :5].sum(1, keepdim=True) > 0).float()
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=5.0)  # deliberately too large

reports = []
for epoch in range(3):
    with deadrelu.Probe(model) as probe:  # observes the training forwards, changes nothing
        for xb, yb in zip(x.split(64), y.split(64)):
            loss = F.binary_cross_entropy_with_logits(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    reports.append(probe.report())
    print(f"epoch {epoch}: loss {loss.item():.3f}, dead units {reports[-1].dead}/{reports[-1].units}")

print(reports[0].diff(reports[-1]))
print(deadrelu.scan(model, x))  # exact statistics of the final model over the whole dataset
