"""An OTLP/HTTP trace receiver the project did not write the decoding of: it accepts
POST /v1/traces (application/x-protobuf), decodes each ExportTraceServiceRequest with the
OpenTelemetry project's own `opentelemetry-proto` package and prints one JSON line per span
on stdout. The first line is {"port": N}: it listens on 127.0.0.1, port 0.

Usage: python3 otlp_receiver.py [--status CODE]   (CODE: answer every export with it)
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

STATUS = 200
if "--status" in sys.argv:
    STATUS = int(sys.argv[sys.argv.index("--status") + 1])


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/traces" or STATUS != 200:
            self.send_response(404 if self.path != "/v1/traces" else STATUS)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        lines = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    lines.append(
                        json.dumps(
                            {
                                "content_type": self.headers.get("Content-Type"),
                                "resource": resource,
                                "scope": ss.scope.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "name": span.name,
                                "kind": span.kind,
                                "start_ns": span.start_time_unix_nano,
                                "end_ns": span.end_time_unix_nano,
                                "attributes": attributes(span.attributes),
                                "status_code": span.status.code,
                                "trace_state": span.trace_state,
                            }
                        )
                    )
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
sys.stdout.write(json.dumps({"port": server.server_address[1]}) + "\n")
sys.stdout.flush()
server.serve_forever()
