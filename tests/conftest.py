import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(impl: str = "sdpa", layers: int = 4, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama with GQA (4 query heads, 2 KV heads), float32, eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **overrides,
    )
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=["eager", "sdpa"])
def backend(request) -> str:
    return request.param


def prompt(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama saved with the embedded model's real tokenizer (chat template, EOS ids): a model folder
    the harness and the CLI load like any other, fast."""
    from transformers import AutoTokenizer

    from kvcake.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(None))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-chat")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class CountOperators(TorchDispatchMode):
    """Counts the operators that compute (views left out) while it is entered."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += not func.is_view
        return func(*args, **(kwargs or {}))
