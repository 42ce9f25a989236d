// Run a qcompiler-compiled model with ONNX Runtime's Java binding (ai.onnxruntime, Maven
// com.microsoft.onnxruntime:onnxruntime, CPU).
//
//   javac -cp onnxruntime-VERSION.jar Main.java
//   java -cp onnxruntime-VERSION.jar:. Main model.q.onnx [threads]
//
// Feeds the model's first input (float32; dynamic dimensions set to 1) with x[i] = ((i % 17) - 8) / 8 and prints
// each output's name, shape and values, one value a line (%.9g, so a float32 round-trips).
import ai.onnxruntime.NodeInfo;
import ai.onnxruntime.OnnxJavaType;
import ai.onnxruntime.OnnxTensor;
import ai.onnxruntime.OnnxValue;
import ai.onnxruntime.OrtEnvironment;
import ai.onnxruntime.OrtException;
import ai.onnxruntime.OrtSession;
import ai.onnxruntime.TensorInfo;
import java.nio.FloatBuffer;
import java.util.Locale;
import java.util.Map;
import java.util.StringJoiner;

public class Main {
  public static void main(String[] args) throws OrtException {
    if (args.length < 1) {
      System.err.println("usage: java -cp onnxruntime.jar:. Main model.onnx [threads]");
      System.exit(2);
    }
    int threads = args.length > 1 ? Integer.parseInt(args[1]) : 1;
    OrtEnvironment env = OrtEnvironment.getEnvironment();  // one per process, shared by all sessions
    try (OrtSession.SessionOptions options = new OrtSession.SessionOptions()) {
      options.setIntraOpNumThreads(threads);  // threads inside one op (0: one per physical core)
      options.setInterOpNumThreads(1);        // threads across ops (used in PARALLEL mode only)
      options.setExecutionMode(OrtSession.SessionOptions.ExecutionMode.SEQUENTIAL);
      options.setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT);
      options.addConfigEntry("session.intra_op.allow_spinning", "0");  // idle threads sleep instead of spinning
      try (OrtSession session = env.createSession(args[0], options)) {
        // getInputInfo() is ordered by input index: the first entry is input 0.
        Map.Entry<String, NodeInfo> first = session.getInputInfo().entrySet().iterator().next();
        TensorInfo info = (TensorInfo) first.getValue().getInfo();
        if (info.type != OnnxJavaType.FLOAT) {
          throw new IllegalArgumentException("input " + first.getKey() + " is not float32");
        }
        long[] shape = info.getShape();
        int count = 1;
        for (int d = 0; d < shape.length; d++) {
          if (shape[d] <= 0) shape[d] = 1;  // a dynamic dimension (-1)
          count *= (int) shape[d];
        }
        FloatBuffer data = FloatBuffer.allocate(count);
        for (int i = 0; i < count; i++) data.put(i, ((i % 17) - 8) / 8.0f);

        try (OnnxTensor input = OnnxTensor.createTensor(env, data, shape);
            OrtSession.Result result = session.run(Map.of(first.getKey(), input))) {
          for (Map.Entry<String, OnnxValue> output : result) {
            OnnxTensor tensor = (OnnxTensor) output.getValue();
            if (tensor.getInfo().type != OnnxJavaType.FLOAT) {
              throw new IllegalStateException("output " + output.getKey() + " is not float32");
            }
            StringJoiner dims = new StringJoiner(",", "[", "]");
            for (long d : tensor.getInfo().getShape()) dims.add(Long.toString(d));
            System.out.println("output " + output.getKey() + " float32 " + dims);
            FloatBuffer values = tensor.getFloatBuffer();  // a copy, in row-major order
            while (values.hasRemaining()) {
              System.out.println(String.format(Locale.ROOT, "%.9g", (double) values.get()));
            }
          }
        }
      }
    }
  }
}
