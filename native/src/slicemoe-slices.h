// Sliced models inside the engine: which MoE layers have AMAT bit slices, and at what precision
// the graph runs them.
#pragma once

struct llama_model;

// Register the MSB/LSB slice tensors of every MoE layer of a sliced model (a model without LSB
// tensors registers nothing). precision is a slicemoe_precision value.
int  slicemoe_slices_attach(const llama_model * model, int precision);
void slicemoe_slices_detach(const llama_model * model);
// Number of MoE layers registered for this model (0 for a stock model).
int  slicemoe_slices_n_layers(const llama_model * model);
