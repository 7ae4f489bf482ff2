"""Training, outside the inference path: ``engine`` (the one loop, run settings, Polyak averaging, processes),
``checkpoint`` (safetensors plus JSON), and the trainers that use them: ``classifier`` (section 6's recipe),
``detector`` (R-CNN fine-tuning, with ``proposal_cache`` and ``windows``) and ``multibox``. Nothing outside this
package imports it except the CLI, lazily."""
