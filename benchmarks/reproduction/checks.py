"""The rule checks of docs/results.md, section 4 (is a gap to the published numbers a bug?):
fa and kp with B = W against backprop, and the gradient angles of every rule on LeNet at
initialisation and after the section-1 MNIST run (runs/reproduce/lenet_mnist-cpu)."""

import torch
from torch.nn import functional as F

import biograd
from biograd.alignment import gradient_alignment
from biograd.models import build_model

torch.manual_seed(0)
x, y = torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,))


def lenet(rule):
    torch.manual_seed(0)
    return biograd.convert(build_model("lenet", in_shape=(1, 28, 28), init="xavier"), rule, seed=0)


ref = lenet("bp")
F.cross_entropy(ref(x), y).backward()
for rule in ("fa", "kp"):  # B := W must give backprop's gradients exactly
    m = lenet(rule)
    for _, layer in biograd.converted_layers(m):
        biograd.feedback_weight(layer).data.copy_(layer.weight.data)
    F.cross_entropy(m(x), y).backward()
    grads = {n: p.grad for n, p in m.named_parameters() if not n.endswith("feedback")}
    diff = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
    print(f"{rule} with B = W: max |grad - bp grad| = {diff:.1e}")
for rule in ("fa", "dfa", "usf", "frsf", "brsf", "kp"):  # gradient angle with bp at init
    m = (
        lenet(rule)
        if rule != "dfa"
        else biograd.convert(
            build_model("lenet", in_shape=(1, 28, 28), init="xavier"),
            "dfa",
            seed=0,
            example_input=x[:2],
        )
    )
    angles = gradient_alignment(m, F.cross_entropy, x, y)
    print(rule, " ".join(f"{k}={v['angle']:.0f}" for k, v in angles.items()))

# after one epoch of MNIST (runs/reproduce/lenet_mnist-cpu): feedback rules align with bp
from biograd.data import load_dataset  # noqa: E402
from biograd.experiment.config import load_config  # noqa: E402
from biograd.experiment.trainer import build, final_state  # noqa: E402

run = "runs/reproduce/lenet_mnist-cpu/default"
cfg = load_config(f"{run}/config.yaml")
test = load_dataset("mnist", root="/work/shared/data", split="test")
mean, std = test.mean[0], test.std[0]
xt, yt = (test.x[:512] - mean) / std, test.y[:512]
for rule in ("fa", "dfa", "usf"):
    m = build(cfg.for_rule(rule), rule, 0, (1, 28, 28), 10)
    m.load_state_dict(final_state(run, rule, 0))
    angles = gradient_alignment(m, F.cross_entropy, xt, yt)
    print("trained", rule, " ".join(f"{k}={v['angle']:.0f}" for k, v in angles.items()))
