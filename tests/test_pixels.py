

def test_cuda_warm_up_covers_every_allowed_resolution_and_batch_size():
    spec = VariantSpec(id="nano-test", weights="recipe", backbone="swin_v1_nano",
                       allowed_resolutions=("1024x1024", "2048x2048"))
    predictor = Predictor(spec, Settings(device="cpu", max_batch_size=3))
    assert predictor.warmup_shapes() == [((64, 64), 1)], "CPU: one small proof-of-life forward"
    predictor._device = torch.device("cuda")  # the plan only; nothing runs
    assert predictor.warmup_shapes() == [((1024, 1024), b) for b in (1, 2, 3)] + [((2048, 2048), b) for b in (1, 2, 3)]
    predictor.settings = Settings(device="cpu", max_batch_size=3, warmup_all_shapes=False)
    assert predictor.warmup_shapes() == [((1024, 1024), 1)]
