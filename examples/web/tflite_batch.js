// Pin a .tflite model's dynamic batch dimension to 1, in place, for LiteRT.js.
//
// deploykit exports the batch dimension as dynamic (shape_signature −1) so that the Python
// runners can resize it. LiteRT.js 2.5 has no resize call and checks every input buffer against
// the signature, so a [1, H, W, C] tensor is refused against [-1, H, W, C]. The file already
// stores the batch-1 shape each tensor is allocated with (`shape`); writing 1 over the −1 at the
// head of each tensor's `shape_signature` makes the model the static batch-1 model LiteRT.js
// can run. Only those int32 values change — weights, quantization and ops stay as exported —
// and the caller checks the file's sha256 before this edit.
//
// The flatbuffer walk follows tensorflow/compiler/mlir/lite/schema/schema.fbs:
//   Model.subgraphs (field 2) → SubGraph.tensors (field 0) → Tensor.shape_signature (field 7).

const MODEL_SUBGRAPHS = 2;
const SUBGRAPH_TENSORS = 0;
const TENSOR_SHAPE_SIGNATURE = 7;

class FlatBuffer {
  constructor(bytes) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  root() {
    return this.view.getUint32(0, true);
  }

  // Where field `id` of the table at `table` is stored, or null when the field is absent.
  field(table, id) {
    const vtable = table - this.view.getInt32(table, true);
    const entry = 4 + 2 * id;
    if (entry >= this.view.getUint16(vtable, true)) return null;
    const offset = this.view.getUint16(vtable + entry, true);
    return offset ? table + offset : null;
  }

  // A field holding an offset (vector, table) → the position it points to.
  deref(position) {
    return position + this.view.getUint32(position, true);
  }

  // The positions of a vector's elements (each `size` bytes wide).
  elements(vector, size) {
    const length = this.view.getUint32(vector, true);
    return Array.from({length}, (_, i) => vector + 4 + size * i);
  }
}

// Returns how many tensors had their batch dimension pinned (0: the model was already static).
export function pinBatchToOne(bytes) {
  const fb = new FlatBuffer(bytes);
  const subgraphs = fb.field(fb.root(), MODEL_SUBGRAPHS);
  if (subgraphs === null) throw new Error('not a TFLite model: it has no subgraphs');
  let pinned = 0;
  for (const subgraphRef of fb.elements(fb.deref(subgraphs), 4)) {
    const tensors = fb.field(fb.deref(subgraphRef), SUBGRAPH_TENSORS);
    if (tensors === null) continue;
    for (const tensorRef of fb.elements(fb.deref(tensors), 4)) {
      const signature = fb.field(fb.deref(tensorRef), TENSOR_SHAPE_SIGNATURE);
      if (signature === null) continue;
      const [batch] = fb.elements(fb.deref(signature), 4);
      if (batch !== undefined && fb.view.getInt32(batch, true) === -1) {
        fb.view.setInt32(batch, 1, true);
        pinned++;
      }
    }
  }
  return pinned;
}
