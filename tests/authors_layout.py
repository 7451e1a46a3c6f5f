"""Modules with the class names, constructor arguments and attribute layout of the authors' FNeVR
code (`zengbohan0217/FNeVR`, itself on first-order-model), written here from
`../shared/reference/FNEVR_FACTS.md` and checked against the published key list
(`tests/data/published_vox256_keys.json`) and `published_model.py`. Their forwards compute as the
published ones do, in plain PyTorch, including the module-level `volume_render` loop and the
`F.grid_sample` calls with PyTorch's defaults, so that `fnevr.patch` meets what it meets in their
code. The benchmark `bench_patch.py` uses them when no checkout of the authors' code is given.
"""

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def make_coordinate_grid(h, w, dtype):
    """[h, w, 2] of (x, y), -1 and +1 at the centres of the first and last pixels."""
    xs = 2 * (torch.arange(w, dtype=dtype) / (w - 1)) - 1
    ys = 2 * (torch.arange(h, dtype=dtype) / (h - 1)) - 1
    return torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)], -1)


def kp2gaussian(value, size, variance):
    grid = make_coordinate_grid(*size, value.dtype).to(value.device)
    return torch.exp(-0.5 * ((grid - value[:, :, None, None]) ** 2).sum(-1) / variance)


class SameBlock2d(nn.Module):
    def __init__(self, in_features, out_features, kernel_size=3, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class DownBlock2d(SameBlock2d):
    def __init__(self, in_features, out_features, kernel_size=3, padding=1):
        super().__init__(in_features, out_features, kernel_size, padding)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(super().forward(x))


class UpBlock2d(SameBlock2d):
    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2.0))


class ResBlock3d(nn.Module):
    def __init__(self, in_features, kernel_size, padding):
        super().__init__()
        self.conv1 = nn.Conv3d(in_features, in_features, kernel_size, padding=padding)
        self.conv2 = nn.Conv3d(in_features, in_features, kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm3d(in_features)
        self.norm2 = nn.BatchNorm3d(in_features)

    def forward(self, x):
        return x + self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class Encoder(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features):
        super().__init__()
        sizes = [in_features] + [min(max_features, block_expansion * 2 ** (i + 1)) for i in range(num_blocks)]
        self.down_blocks = nn.ModuleList(DownBlock2d(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x):
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features):
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            width = min(max_features, block_expansion * 2 ** (i + 1))
            blocks.append(
                UpBlock2d(width * (1 if i == num_blocks - 1 else 2), min(max_features, block_expansion * 2**i))
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, outs):
        out = outs.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), outs.pop()], 1)
        return out


class Hourglass(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))


class AntiAliasInterpolation2d(nn.Module):
    def __init__(self, channels, scale):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1
        t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        k = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = k[:, None] * k[None, :]
        self.register_buffer("weight", (kernel / kernel.sum()).expand(channels, 1, size, size).clone())
        self.stride = round(1 / scale)

    def forward(self, x):
        p = self.weight.shape[-1] // 2
        return F.conv2d(F.pad(x, (p, p, p, p)), self.weight, groups=x.shape[1])[:, :, :: self.stride, :: self.stride]


class KPDetector(nn.Module):
    def __init__(
        self, block_expansion, num_kp, num_channels, max_features, num_blocks, temperature,
        estimate_jacobian=False, scale_factor=1, single_jacobian_map=False, pad=0,
    ):  # fmt: skip
        super().__init__()
        self.predictor = Hourglass(block_expansion, num_channels, num_blocks, max_features)
        self.kp = nn.Conv2d(self.predictor.out_filters, num_kp, 7, padding=pad)
        self.jacobian = nn.Conv2d(self.predictor.out_filters, 4 * num_kp, 7, padding=pad) if estimate_jacobian else None
        self.temperature = temperature
        self.down = AntiAliasInterpolation2d(num_channels, scale_factor) if scale_factor != 1 else None

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        feature = self.predictor(x)
        logits = self.kp(feature)
        B, K, h, w = logits.shape
        heat = F.softmax(logits.view(B, K, -1) / self.temperature, 2).view(B, K, h, w)
        out = {"value": (heat[..., None] * make_coordinate_grid(h, w, heat.dtype)).sum((2, 3))}
        if self.jacobian is not None:
            jac = self.jacobian(feature).view(B, K, 4, h, w)
            out["jacobian"] = (heat[:, :, None] * jac).sum((3, 4)).view(B, K, 2, 2)
        return out


class DenseMotionNetwork(nn.Module):
    def __init__(
        self, block_expansion, num_blocks, max_features, num_kp, num_channels,
        estimate_occlusion_map=False, scale_factor=1, kp_variance=0.01,
    ):  # fmt: skip
        super().__init__()
        self.hourglass = Hourglass(block_expansion, (num_kp + 1) * (num_channels + 1), num_blocks, max_features)
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, 7, padding=3)
        self.occlusion = nn.Conv2d(self.hourglass.out_filters, 1, 7, padding=3) if estimate_occlusion_map else None
        self.num_kp, self.scale_factor, self.kp_variance = num_kp, scale_factor, kp_variance
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)

    def create_heatmap_representations(self, source_image, kp_driving, kp_source):
        size = source_image.shape[2:]
        heat = kp2gaussian(kp_driving["value"], size, self.kp_variance)
        heat = heat - kp2gaussian(kp_source["value"], size, self.kp_variance)
        return torch.cat([heat.new_zeros(heat.shape[0], 1, *size), heat], 1).unsqueeze(2)

    def create_sparse_motions(self, source_image, kp_driving, kp_source):
        B, _, h, w = source_image.shape
        grid = make_coordinate_grid(h, w, source_image.dtype).to(source_image.device)
        rel = grid[None, None] - kp_driving["value"][:, :, None, None]
        jac = kp_source["jacobian"] @ torch.inverse(kp_driving["jacobian"])
        motion = (jac[:, :, None, None] @ rel[..., None]).squeeze(-1) + kp_source["value"][:, :, None, None]
        return torch.cat([grid[None, None].expand(B, 1, h, w, 2), motion], 1)

    def create_deformed_source_image(self, source_image, sparse_motions):
        B, C, h, w = source_image.shape
        repeated = source_image[:, None].expand(B, self.num_kp + 1, C, h, w).reshape(-1, C, h, w)
        warped = F.grid_sample(repeated, sparse_motions.reshape(-1, h, w, 2))
        return warped.view(B, self.num_kp + 1, C, h, w)

    def forward(self, source_image, kp_driving, kp_source):
        if self.scale_factor != 1:
            source_image = self.down(source_image)
        B, _, h, w = source_image.shape
        heat = self.create_heatmap_representations(source_image, kp_driving, kp_source)
        motions = self.create_sparse_motions(source_image, kp_driving, kp_source)
        warped = self.create_deformed_source_image(source_image, motions)
        prediction = self.hourglass(torch.cat([heat, warped], 2).view(B, -1, h, w))
        mask = F.softmax(self.mask(prediction), 1)
        out = {"sparse_deformed": warped, "mask": mask, "deformation": (motions * mask[..., None]).sum(1)}
        if self.occlusion is not None:
            out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction))
        return out


class rgb_predictor(nn.Module):
    def __init__(self, in_channels, simpled_channel=128, floor_num=8):
        super().__init__()
        self.floor_num = floor_num
        self.down_conv = nn.Conv2d(in_channels, simpled_channel, 3, padding=1)

    def forward(self, feature):  # [B, C*D, H, W] -> [B, H, W, D, C]
        x = self.down_conv(feature)
        B, _, h, w = x.shape
        return x.view(B, -1, self.floor_num, h, w).permute(0, 3, 4, 2, 1)


class sigma_predictor(rgb_predictor):
    def __init__(self, in_channels, simpled_channel=128, floor_num=8):
        super().__init__(in_channels, simpled_channel, floor_num)
        e = simpled_channel // floor_num
        self.res_conv3d = nn.Sequential(*[m for _ in range(3) for m in (ResBlock3d(e, 3, 1), nn.BatchNorm3d(e))])

    def forward(self, feature):
        x = self.down_conv(feature)
        B, _, h, w = x.shape
        volume = self.res_conv3d(x.view(B, -1, self.floor_num, h, w))
        return volume.permute(0, 3, 4, 2, 1), {"sigma_map": volume}


class MultiHeadNeRFModel(nn.Module):
    def __init__(self, hidden_size=128, num_encoding_rgb=16, num_encoding_sigma=16):
        super().__init__()
        self.layer1 = nn.Linear(num_encoding_sigma, hidden_size)
        self.layer2 = nn.Linear(hidden_size, hidden_size)
        self.layer3_1 = nn.Linear(hidden_size, 1)
        self.layer3_2 = nn.Linear(hidden_size, hidden_size // 4)
        self.layer3_3 = nn.Linear(num_encoding_rgb, hidden_size)
        self.layer4 = nn.Linear(hidden_size // 4 + hidden_size, hidden_size)
        self.layer5 = nn.Linear(hidden_size, hidden_size)
        self.layer6 = nn.Linear(hidden_size, 256)

    def forward(self, rgb_in, sigma_in):
        a = F.relu(self.layer2(F.relu(self.layer1(sigma_in))))
        x = torch.cat([F.relu(self.layer3_2(a)), F.relu(self.layer3_3(rgb_in))], -1)
        return self.layer6(F.relu(self.layer5(F.relu(self.layer4(x))))), self.layer3_1(a)


def volume_render(rgb_pred, sigma_pred):
    """The published loop: inclusive transmittance over the D samples, [B, H, W, D, C] -> [B, C, H, W]."""
    c, depth = 0, 0
    for i in range(sigma_pred.shape[3]):
        p = F.relu(sigma_pred[:, :, :, i])
        depth = depth - p
        c = c + torch.exp(depth) * (1 - torch.exp(-p)) * rgb_pred[:, :, :, i]
    return c.permute(0, 3, 1, 2)


class RenderModel(nn.Module):
    def __init__(self, in_channels, simpled_channel_rgb, simpled_channel_sigma, floor_num, hidden_size):
        super().__init__()
        self.rgb_predict = rgb_predictor(in_channels, simpled_channel_rgb, floor_num)
        self.sigma_predict = sigma_predictor(in_channels, simpled_channel_sigma, floor_num)
        self.nerf_module = MultiHeadNeRFModel(
            hidden_size, simpled_channel_rgb // floor_num, simpled_channel_sigma // floor_num
        )
        self.mini_decoder = nn.Sequential(UpBlock2d(256, 64), nn.ReLU(), UpBlock2d(64, 3), nn.Sigmoid())

    def forward(self, feature):
        rgb_in = self.rgb_predict(feature)
        sigma_in, point_dict = self.sigma_predict(feature)
        rgb_out, sigma_out = self.nerf_module(rgb_in, sigma_in)
        render = torch.sigmoid(volume_render(rgb_out, sigma_out))
        return {"render": render, "mini_pred": self.mini_decoder(render), "point_pred": point_dict}


class SPADE_layer(nn.Module):
    def __init__(self, norm_channel, label_channel):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_channel, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_channel, 128, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(128, norm_channel, 3, padding=1)
        self.mlp_beta = nn.Conv2d(128, norm_channel, 3, padding=1)

    def forward(self, x, modulation_in):
        actv = self.mlp_shared(F.interpolate(modulation_in, size=x.shape[2:], mode="nearest"))
        return self.param_free_norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADE_block(nn.Module):
    def __init__(self, norm_channel, label_channel, out_channel):
        super().__init__()
        self.SPADE_0 = SPADE_layer(norm_channel, label_channel)
        self.relu_0 = nn.ReLU()
        self.conv_0 = nn.Conv2d(norm_channel, norm_channel, 3, padding=1)
        self.SPADE_1 = SPADE_layer(norm_channel, label_channel)
        self.relu_1 = nn.ReLU()
        self.conv_1 = nn.Conv2d(norm_channel, out_channel, 3, padding=1)

    def forward(self, x, modulation_in):
        x = self.conv_0(self.relu_0(self.SPADE_0(x, modulation_in)))
        return self.conv_1(self.relu_1(self.SPADE_1(x, modulation_in)))


class SPADE_decoder(nn.Module):
    def __init__(self, in_channel, mid_channel):
        super().__init__()
        self.seg_conv = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 3, padding=1), nn.ReLU())
        c = in_channel
        self.SPADE_0 = SPADE_block(c, mid_channel, c // 4)
        self.up_0 = nn.UpsamplingBilinear2d(scale_factor=2)
        self.SPADE_1 = SPADE_block(c // 4, mid_channel, c // 16)
        self.up_1 = nn.UpsamplingBilinear2d(scale_factor=2)
        self.SPADE_2 = SPADE_block(c // 16, mid_channel, c // 16)
        self.SPADE_3 = SPADE_block(c // 16, mid_channel, c // 16)
        self.final = nn.Sequential(nn.Conv2d(c // 16, 3, 7, padding=3), nn.Sigmoid())

    def forward(self, x):
        seg = self.seg_conv(x)
        x = self.up_0(self.SPADE_0(x, seg))
        x = self.up_1(self.SPADE_1(x, seg))
        return self.final(self.SPADE_3(self.SPADE_2(x, seg), seg))


class OcclusionAwareGenerator_SPADE(nn.Module):
    def __init__(
        self, num_channels, num_kp, block_expansion, max_features, num_down_blocks, num_bottleneck_blocks,
        estimate_occlusion_map=False, dense_motion_params=None, render_params=None, estimate_jacobian=False,
    ):  # fmt: skip
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork(
            num_kp=num_kp, num_channels=num_channels, estimate_occlusion_map=estimate_occlusion_map,
            **dense_motion_params,
        )  # fmt: skip
        self.first = SameBlock2d(num_channels, block_expansion, 7, 3)
        widths = [min(max_features, block_expansion * 2**i) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(DownBlock2d(a, b) for a, b in itertools.pairwise(widths))
        self.Render_model = RenderModel(in_channels=widths[-1], **render_params)
        self.decoder = SPADE_decoder(in_channel=widths[-1] * 2, mid_channel=128)

    def deform_input(self, inp, deformation):
        if deformation.shape[1:3] != inp.shape[2:]:
            deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=inp.shape[2:], mode="bilinear")
            deformation = deformation.permute(0, 2, 3, 1)
        return F.grid_sample(inp, deformation)

    def forward(self, source_image, kp_driving, kp_source):
        out = self.first(source_image)
        for block in self.down_blocks:
            out = block(out)
        motion = self.dense_motion_network(source_image=source_image, kp_driving=kp_driving, kp_source=kp_source)
        result = {k: motion[k] for k in ("mask", "sparse_deformed", "occlusion_map")}
        out = self.deform_input(out, motion["deformation"]) * motion["occlusion_map"]
        result["deformed"] = self.deform_input(source_image, motion["deformation"])
        rendered = self.Render_model(feature=out)
        result["render"], result["point_pred"] = rendered["mini_pred"], rendered["point_pred"]
        result["prediction"] = self.decoder(torch.cat([out, rendered["render"]], 1))
        return result


VOX256 = dict(
    num_channels=3, num_kp=10, block_expansion=64, max_features=512, num_down_blocks=2, num_bottleneck_blocks=6,
    estimate_occlusion_map=True, estimate_jacobian=True,
    dense_motion_params=dict(block_expansion=64, max_features=1024, num_blocks=5, scale_factor=0.25),
    render_params=dict(simpled_channel_rgb=128, simpled_channel_sigma=128, floor_num=8, hidden_size=128),
)  # fmt: skip
VOX256_KP = dict(
    num_channels=3, num_kp=10, block_expansion=32, max_features=1024, num_blocks=5, temperature=0.1,
    estimate_jacobian=True, scale_factor=0.25,
)  # fmt: skip
# A small generator for the tests: 64x64 frames, a narrow dense motion, 4 samples per ray.
SMALL = dict(
    VOX256,
    num_kp=4,
    dense_motion_params=dict(block_expansion=8, max_features=32, num_blocks=3, scale_factor=0.25),
    render_params=dict(simpled_channel_rgb=16, simpled_channel_sigma=16, floor_num=4, hidden_size=16),
)
