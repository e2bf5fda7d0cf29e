"""A tiny random Llama with a small word-level tokenizer and a ChatML chat template, saved as a
Hugging Face directory: fast stand-in for a real model in training tests."""
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a is of and to in what which who how color capital city price name blue red green paris rome "
         "berlin zorblax widget gadget costs dollars ten five seven answer question user assistant system yes no "
         "? . , ! : 0 1 2 3 4 5 6 7 8 9").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "\n"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.WhitespaceSplit(),
                                                ])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def make_tiny_model(path, seed=0, layers=2, hidden=64, tied=True):
    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                   max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
