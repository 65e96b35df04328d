"""Written with lcnn-plugin at 47d8113 (before the spectral-norm engine): a small trained LCNN ResNet and a
converted model with InputSpectralNorm layers, their state and their eval logits on a fixed input."""
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Conv2dSame
from torch import nn

from lcnn_plugin import convert
from lcnn_plugin.models import LcnnResNet

torch.manual_seed(0)
net = LcnnResNet(layers=(1, 1, 1, 1), width=4, stem="cifar", num_classes=10)
opt = torch.optim.SGD(net.parameters(), lr=0.05)
net.train()
for _ in range(5):
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
net(torch.rand(8, 3, 16, 16))
net.eval()

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.same = Conv2dSame(6, 6, 3, stride=2)
        self.act = nn.ReLU()
        self.fc = timm.layers.Linear(6, 4)
    def forward(self, x):
        return self.fc(self.act(self.same(self.act(self.stem(x)))).mean((2, 3)))

small = Small()
conv, _ = convert(small, example_input=torch.rand(2, 3, 12, 12), preserve_function=True, bound=False)
conv.train()
with torch.no_grad():
    conv(torch.rand(4, 3, 12, 12))
conv.eval()
gen = torch.Generator().manual_seed(1)
x1 = torch.rand(4, 3, 16, 16, generator=gen)
x2 = torch.rand(4, 3, 12, 12, generator=gen)
with torch.no_grad():
    out = {f"resnet.{k}": v for k, v in net.state_dict().items()}
    out.update({f"converted.{k}": v for k, v in conv.state_dict().items()})
    out.update({"input.resnet": x1, "logits.resnet": net(x1)})
    out.update({"input.converted": x2, "logits.converted": conv(x2)})
save_file({k: v.contiguous() for k, v in out.items()}, "tests/data/sn_checkpoint_47d8113.safetensors")
print({k: tuple(v.shape) for k, v in out.items() if "sn_" in k})
