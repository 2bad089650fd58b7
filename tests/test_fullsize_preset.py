"""``seed-story-random``, the release's sizes with random weights (bench/bench_fullsize.py), has exactly the
released files' tensors: built on the meta device (no memory, seconds) and checked against the key/shape
manifests packaged with the release loaders."""
from seedstory.checkpoints.release_manifests import release_manifest
from seedstory.pipeline import SeedStoryPipeline


def test_seed_story_random_has_the_released_shapes():
    pipe = SeedStoryPipeline.from_preset("seed-story-random", ["runtime.device=meta", "runtime.dtype=bf16"])

    def shapes(module):
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    agent = {k.replace("llm.base_model.model.", "llm.").replace(".modules_to_save.default", ""): v
             for k, v in release_manifest("agent_seed_story_george_sft").items()
             if "lora_" not in k and "original_module" not in k and "inv_freq" not in k}
    assert shapes(pipe.agent) == agent  # Llama-2-7b (vocabulary 32066) and both resamplers
    detok = shapes(pipe.detokenizer)
    assert {k: detok[k] for k in release_manifest("detokenizer_george_adapted")} == \
        release_manifest("detokenizer_george_adapted")  # the XL resampler and the SDXL UNet (the VAE is extra)
    assert shapes(pipe.visual_tokenizer) == release_manifest("qwen_vit_G")
    assert pipe.settings.num_inference_steps == 50 and pipe.settings.height == 1024


def test_a_random_model_built_in_bf16_holds_every_weight_in_bf16(opening_image):
    """As ``bench/bench_fullsize.py`` builds seed-story-random on a GPU: no table left in fp32 (the resamplers'
    position tables were, and the ViT's pooling then mixed dtypes and stopped), the VAE alone kept in fp32."""
    import torch

    pipe = SeedStoryPipeline.from_preset("seed-story-random", ["runtime.device=meta", "runtime.dtype=bf16"])
    for name, module in (("visual_tokenizer", pipe.visual_tokenizer), ("agent", pipe.agent),
                         ("resampler", pipe.detokenizer.resampler), ("unet", pipe.detokenizer.unet)):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
    tiny = SeedStoryPipeline.from_preset("tiny", ["runtime.dtype=bf16"])
    assert tiny.encode_image(opening_image).shape[1:] == (tiny.visual_tokenizer.config.n_queries,
                                                          tiny.visual_tokenizer.config.output_dim)
