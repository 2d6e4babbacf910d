"""A chat or echo request resumed on another replica after its first one died: the continuation is
the rendered prompt plus the streamed tokens, without the messages (which would be rendered again
and win over the token ids) and without echoing the prompt a second time."""

from __future__ import annotations

from tokenmill.services.inference.dispatch.failover import _Routing
from tokenmill.services.inference.dispatch.protocol import Accepted
from tokenmill.v1 import inference_pb2


def chat_request(echo: bool) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(request_id="c1")
    req.messages.add(role="user", content="hi")
    req.sampling.max_tokens = 8
    req.sampling.echo = echo
    return req


def test_continuation_of_a_chat_drops_its_messages_and_the_echo():
    routing = _Routing.start(chat_request(echo=True), 60.0)
    first = routing.request()
    assert [m.content for m in first.messages] == ["hi"] and first.sampling.echo
    routing.accept(Accepted("r0", [1, 5, 6, 7], 8))
    routing.next_attempt()
    before_any_token = routing.request()
    assert not before_any_token.messages and list(before_any_token.prompt_token_ids) == [1, 5, 6, 7]
    assert before_any_token.sampling.echo  # nothing went out yet: the prompt is still to be echoed
    routing.streamed.extend([9, 10])
    routing.next_attempt()
    after = routing.request()
    assert list(after.prompt_token_ids) == [1, 5, 6, 7, 9, 10] and not after.messages
    assert not after.sampling.echo and after.sampling.max_tokens == 6
