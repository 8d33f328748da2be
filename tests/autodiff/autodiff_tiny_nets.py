"""Tiny torch nets with the operator mix of ResNet, MobileNetV3, DenseNet, ViT and ConvNeXt, and spatial transformers."""
import torch, torch.nn as nn, torch.nn.functional as F
class ResBlock(nn.Module):
    def __init__(s, c):
        super().__init__(); s.c1=nn.Conv2d(c,c,3,padding=1,bias=False); s.b1=nn.BatchNorm2d(c); s.c2=nn.Conv2d(c,c,3,padding=1,bias=False); s.b2=nn.BatchNorm2d(c)
    def forward(s,x): return F.relu(x + s.b2(s.c2(F.relu(s.b1(s.c1(x))))))
class TinyResNet(nn.Module):
    def __init__(s):
        super().__init__(); s.stem=nn.Sequential(nn.Conv2d(3,8,5,stride=2,padding=2,bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3,2,1))
        s.layer=ResBlock(8); s.fc=nn.Linear(8,5)
    def forward(s,x): return s.fc(torch.flatten(F.adaptive_avg_pool2d(s.layer(s.stem(x)),1),1))
class SE(nn.Module):
    def __init__(s,c): super().__init__(); s.a=nn.Conv2d(c,4,1); s.b=nn.Conv2d(4,c,1)
    def forward(s,x): return x*F.hardsigmoid(s.b(F.relu(s.a(F.adaptive_avg_pool2d(x,1)))))
class TinyMobileNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.f=nn.Sequential(nn.Conv2d(3,8,3,2,1), nn.BatchNorm2d(8), nn.Hardswish(), nn.Conv2d(8,8,3,1,1,groups=8), nn.BatchNorm2d(8), nn.ReLU6(), SE(8), nn.Conv2d(8,12,1), nn.Hardswish())
        s.h=nn.Sequential(nn.Linear(12,16), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(16,5))
    def forward(s,x): return s.h(F.adaptive_avg_pool2d(s.f(x),1).flatten(1))
class TinyDense(nn.Module):
    def __init__(s):
        super().__init__(); s.c0=nn.Conv2d(3,6,3,padding=1); s.b1=nn.BatchNorm2d(6); s.c1=nn.Conv2d(6,4,3,padding=1); s.b2=nn.BatchNorm2d(10); s.t=nn.Conv2d(10,6,1); s.fc=nn.Linear(6,5)
    def forward(s,x):
        x=s.c0(x); x=torch.cat([x, s.c1(F.relu(s.b1(x)))],1); x=F.avg_pool2d(s.t(F.relu(s.b2(x))),2)
        return s.fc(F.relu(x).mean((2,3)))
class Attn(nn.Module):
    def __init__(s,d,h): super().__init__(); s.h=h; s.qkv=nn.Linear(d,3*d); s.o=nn.Linear(d,d)
    def forward(s,x):
        B,N,D=x.shape; q,k,v=s.qkv(x).reshape(B,N,3,s.h,D//s.h).permute(2,0,3,1,4)
        a=(q@k.transpose(-2,-1))*(D//s.h)**-0.5; a=a.softmax(-1)
        return s.o((a@v).transpose(1,2).reshape(B,N,D))
class TinyViT(nn.Module):
    def __init__(s,d=16):
        super().__init__(); s.pe=nn.Conv2d(3,d,4,4); s.cls=nn.Parameter(torch.randn(1,1,d)); s.pos=nn.Parameter(torch.randn(1,17,d)*.1)
        s.n1=nn.LayerNorm(d); s.at=Attn(d,2); s.n2=nn.LayerNorm(d); s.mlp=nn.Sequential(nn.Linear(d,32), nn.GELU(), nn.Linear(32,d)); s.n=nn.LayerNorm(d); s.head=nn.Linear(d,5)
    def forward(s,x):
        x=s.pe(x).flatten(2).transpose(1,2); x=torch.cat([s.cls.expand(x.shape[0],-1,-1),x],1)+s.pos
        x=x+s.at(s.n1(x)); x=x+s.mlp(s.n2(x)); return s.head(s.n(x)[:,0])
class CNBlock(nn.Module):
    def __init__(s,c): super().__init__(); s.dw=nn.Conv2d(c,c,7,padding=3,groups=c); s.ln=nn.LayerNorm(c); s.l1=nn.Linear(c,4*c); s.l2=nn.Linear(4*c,c); s.g=nn.Parameter(torch.full((c,),0.5))
    def forward(s,x):
        y=s.dw(x).permute(0,2,3,1); y=s.l2(F.gelu(s.l1(s.ln(y))))*s.g; return x+y.permute(0,3,1,2)
class TinyConvNeXt(nn.Module):
    def __init__(s): super().__init__(); s.stem=nn.Conv2d(3,8,2,2); s.b=CNBlock(8); s.n=nn.LayerNorm(8); s.fc=nn.Linear(8,5)
    def forward(s,x): return s.fc(s.n(s.b(s.stem(x)).mean((-2,-1))))
class TinyUpsample(nn.Module):
    """Resize in the body of a dynamic-batch export: only the resized axes have static sizes."""
    def __init__(s): super().__init__(); s.c1=nn.Conv2d(3,6,3,2,1); s.up=nn.Upsample(scale_factor=2, mode="bilinear"); s.c2=nn.Conv2d(6,6,3,2,1); s.fc=nn.Linear(6,5)
    def forward(s,x):
        x=s.c2(s.up(F.relu(s.c1(x)))); x=F.interpolate(F.relu(x), scale_factor=2, mode="nearest")
        return s.fc(x.mean((2,3)))
class TinyCosine(nn.Module):
    """A cosine-similarity head (CLIP-style zero-shot classifiers): F.normalize exports as ReduceL2 or its parts."""
    def __init__(s): super().__init__(); s.c=nn.Conv2d(3,8,3,2,1); s.w=nn.Parameter(torch.randn(5,8))
    def forward(s,x): return 10*F.normalize(F.relu(s.c(x)).mean((2,3)),dim=1)@F.normalize(s.w,dim=1).t()
class TinySdpaViT(nn.Module):
    """ViT with RMSNorm and F.scaled_dot_product_attention: the dynamo exporter at opset 23+ writes ONNX Attention and
    RMSNormalization."""
    def __init__(s,d=16):
        super().__init__(); s.pe=nn.Conv2d(3,d,4,4); s.cls=nn.Parameter(torch.randn(1,1,d)); s.n1=nn.RMSNorm(d); s.qkv=nn.Linear(d,3*d); s.o=nn.Linear(d,d); s.n=nn.RMSNorm(d); s.head=nn.Linear(d,5)
    def forward(s,x):
        x=s.pe(x).flatten(2).transpose(1,2); x=torch.cat([s.cls.expand(x.shape[0],-1,-1),x],1); B,N,D=x.shape
        q,k,v=s.qkv(s.n1(x)).reshape(B,N,3,2,D//2).permute(2,0,3,1,4)
        x=x+s.o(F.scaled_dot_product_attention(q,k,v).transpose(1,2).reshape(B,N,D)); return s.head(s.n(x)[:,0])
class TinySTN(nn.Module):
    """A spatial-transformer classifier: a localisation net predicts theta (near a zoom-out, so the grid reaches past
    the image), F.affine_grid and F.grid_sample warp a feature map, a conv head classifies. written: the grid as base
    points times theta^T, by hand (the legacy exporter has affine_grid at opset 20 only)."""
    def __init__(s, mode="bilinear", padding="zeros", align=False, written=False):
        super().__init__(); s.mode,s.padding,s.align,s.written=mode,padding,align,written
        s.loc=nn.Conv2d(3,4,3,2,1); s.theta=nn.Linear(4,6); s.feat=nn.Sequential(nn.Conv2d(3,6,3,padding=1), nn.Tanh()); s.head=nn.Conv2d(6,8,3,2,1); s.fc=nn.Linear(8,5)
        with torch.no_grad(): s.theta.weight.mul_(0.5); s.theta.bias.copy_(torch.tensor([1.3,0.2,0.1,-0.15,1.25,0.05]))
        base=F.affine_grid(torch.eye(2,3)[None],[1,1,16,16],align_corners=align).reshape(256,2)
        s.register_buffer("base", torch.cat([base, torch.ones(256,1)],1))
    def forward(s,x):
        theta=s.theta(F.relu(s.loc(x)).mean((2,3))).view(-1,2,3); f=s.feat(x)
        grid=(s.base@theta.transpose(1,2)).view(-1,16,16,2) if s.written else F.affine_grid(theta,list(f.shape),align_corners=s.align)
        return s.fc(F.relu(s.head(F.grid_sample(f,grid,mode=s.mode,padding_mode=s.padding,align_corners=s.align))).mean((2,3)))
class TinyGFNet(nn.Module):
    """GFNet-style global filter (Rao et al. 2021): rfft2 over the token grid, a learned complex filter, irfft2. The
    dynamo exporter writes DFT nodes (one-sided, full, inverse and inverse one-sided); the legacy one has no FFT."""
    def __init__(s,d=8):
        super().__init__(); s.pe=nn.Conv2d(3,d,2,2); s.n1=nn.LayerNorm(d); s.w=nn.Parameter(torch.randn(8,5,d,2)*0.3); s.n2=nn.LayerNorm(d); s.l1=nn.Linear(d,2*d); s.l2=nn.Linear(2*d,d); s.n=nn.LayerNorm(d); s.head=nn.Linear(d,5)
    def forward(s,x):
        x=s.pe(x).permute(0,2,3,1); f=torch.fft.rfft2(s.n1(x),dim=(1,2),norm="ortho")*torch.view_as_complex(s.w)
        x=x+torch.fft.irfft2(f,s=(8,8),dim=(1,2),norm="ortho"); x=x+s.l2(F.gelu(s.l1(s.n2(x)))); return s.head(s.n(x).mean((1,2)))
STNS={"stn":TinySTN, "stn_reflect":lambda: TinySTN(padding="reflection",align=True), "stn_border":lambda: TinySTN(padding="border",written=True),
      "stn_nearest":lambda: TinySTN(mode="nearest",align=True)}
NETS={"sdpa_vit":TinySdpaViT,"cosine":TinyCosine,"upsample":TinyUpsample,"resnet":TinyResNet,"mobilenet":TinyMobileNet,"densenet":TinyDense,"vit":TinyViT,"convnext":TinyConvNeXt,"gfnet":TinyGFNet}
NETS.update(STNS)
