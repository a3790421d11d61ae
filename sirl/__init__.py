"""sirl: a lean single-node GRPO trainer for SIRL (Safety Instincts RL) built on sirl_kernels."""
