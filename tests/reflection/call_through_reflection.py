#!/usr/bin/env python3
"""Calls a gRPC method knowing nothing but what the server's reflection says, as grpcurl
does: resolves the service and every file it imports through grpc.reflection.v1alpha,
builds the request from JSON, and prints the answer as JSON.

Usage: call_through_reflection.py HOST:PORT SERVICE METHOD REQUEST_JSON
"""
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    target, service_name, method_name, request_json = sys.argv[1:5]
    channel = grpc.insecure_channel(target)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(service_name)
    method = service.FindMethodByName(method_name)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(request_json, request_class())
    call = channel.unary_unary(
        f"/{service.full_name}/{method.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    print(json_format.MessageToJson(call(request, timeout=10), indent=None))


if __name__ == "__main__":
    main()
