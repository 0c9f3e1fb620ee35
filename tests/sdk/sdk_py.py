"""Drives one Python vendor SDK for the SDK compatibility suite (tests/sdk_compat.rs).

Usage: sdk_py.py SDK CASE, where SDK is meta | twilio | sendgrid | mandrill | tiktok
and CASE is granted | denied | mixed. The SDK is used as an app would use it;
tests/sdk_compat.rs sets the environment that routes it through consentgate
and trusts the interception CA the way that SDK needs (docs/SDKS.md).

Prints one JSON line: {"calls": [outcome, ...]}, one outcome per API call:
  {"ok": true}                                        the SDK returned normally
  {"ok": false, "exc_type": "module.Class",            the SDK raised
   "sdk_message": "...", "status": 451}
`sdk_message` is what the SDK hands the app as the error's message (the field
an app would log), so the Rust side can check it starts from `consentgate:`.
Any exception is reported, including a crash inside the SDK's own error
handling (AttributeError, KeyError): that is exactly what the suite looks for.
"""

import json
import os
import sys
import time

# Fixture patients (config/consent.example.jsonl): P-1001 has every category
# granted, P-1002 every one denied; the third address names nobody.
GRANTED = ("jane.roe@example.com", "+14155550100")
DENIED = ("deny.me@example.com", "+14155550102")
UNKNOWN = ("unknown.person@example.com", "+15555550199")

PEOPLE = {
    "granted": [GRANTED],
    "denied": [DENIED],
    "mixed": [GRANTED, DENIED, UNKNOWN],
}


def qualified(exc):
    t = type(exc)
    return "%s.%s" % (t.__module__, t.__qualname__)


def outcome_of(call, message_of):
    try:
        call()
        return {"ok": True}
    except Exception as e:  # noqa: BLE001 - the suite wants to see every kind
        try:
            msg, status = message_of(e)
        except Exception:  # the SDK's own error object was not what it documents
            msg, status = repr(e), None
        return {"ok": False, "exc_type": qualified(e), "sdk_message": msg, "status": status}


# --- Meta: facebook-business (requests; HTTPS_PROXY, REQUESTS_CA_BUNDLE) ------
def meta(people):
    from facebook_business.api import FacebookAdsApi
    from facebook_business.adobjects.serverside.action_source import ActionSource
    from facebook_business.adobjects.serverside.event import Event
    from facebook_business.adobjects.serverside.event_request import EventRequest
    from facebook_business.adobjects.serverside.user_data import UserData
    from facebook_business.exceptions import FacebookRequestError

    FacebookAdsApi.init(access_token="sdk-suite-token")

    def send():
        events = [
            Event(
                event_name="Purchase",
                event_time=int(time.time()),
                user_data=UserData(emails=[email], phones=[phone]),
                action_source=ActionSource.WEBSITE,
            )
            for email, phone in people
        ]
        EventRequest(events=events, pixel_id="1234567890").execute()

    def message_of(e):
        if isinstance(e, FacebookRequestError):
            return e.api_error_message(), e.http_status()
        return repr(e), None

    return [outcome_of(send, message_of)]


# --- Twilio: twilio (requests; HTTPS_PROXY, REQUESTS_CA_BUNDLE) ----------------
def twilio(people):
    from twilio.base.exceptions import TwilioRestException
    from twilio.rest import Client

    client = Client("AC" + "0" * 32, "sdk-suite-token")

    def message_of(e):
        if isinstance(e, TwilioRestException):
            return e.msg, e.status
        return repr(e), None

    # One recipient per Messages call, so "mixed" is one call per person.
    return [
        outcome_of(
            lambda phone=phone: client.messages.create(
                to=phone, from_="+15005550006", body="Your appointment is tomorrow at 9."
            ),
            message_of,
        )
        for _, phone in people
    ]


# --- SendGrid: sendgrid + python_http_client (urllib; HTTPS_PROXY, SSL_CERT_FILE)
def sendgrid(people):
    import python_http_client.exceptions as pe
    from sendgrid import SendGridAPIClient
    from sendgrid.helpers.mail import Mail

    client = SendGridAPIClient(api_key="SG.sdk-suite-key")

    def send():
        mail = Mail(
            from_email="clinic@hospital.example",
            to_emails=[email for email, _ in people],
            subject="Flu shots are here",
            plain_text_content="Book yours today.",
            is_multiple=True,  # one personalization per recipient
        )
        client.send(mail)

    def message_of(e):
        if isinstance(e, pe.HTTPError):
            # HTTPError's str() is urllib's "HTTP Error 451: <reason>"; the
            # vendor's message is only in the body the SDK keeps.
            body = e.body.decode("utf-8", "replace") if isinstance(e.body, bytes) else str(e.body)
            return body, e.status_code
        return repr(e), None

    return [outcome_of(send, message_of)]


# --- Mailchimp Transactional: mailchimp_transactional (requests) -------------
def mandrill(people):
    import mailchimp_transactional
    from mailchimp_transactional.api_client import ApiClientError

    client = mailchimp_transactional.Client("md-sdk-suite-key")

    def send():
        client.messages.send(
            {
                "message": {
                    "from_email": "clinic@hospital.example",
                    "subject": "Flu shots are here",
                    "text": "Book yours today.",
                    "to": [{"email": email, "type": "to"} for email, _ in people],
                }
            }
        )

    def message_of(e):
        if isinstance(e, ApiClientError):
            text = e.text if isinstance(e.text, str) else json.dumps(e.text)
            return text, e.status_code
        return repr(e), None

    return [outcome_of(send, message_of)]


# --- TikTok: tiktok-business-api-sdk-official (urllib3; its own proxy and CA options)
def tiktok(people):
    import business_api_client
    from business_api_client.rest import ApiException
    from business_api_client.tiktok_business.tiktok_exceptions import TiktokSDKError

    # The SDK reads neither HTTPS_PROXY nor any CA variable: urllib3 with
    # certifi unless Configuration.proxy / .ssl_ca_cert are set.
    cfg = business_api_client.Configuration()
    cfg.proxy = os.environ["HTTPS_PROXY"]
    cfg.ssl_ca_cert = os.environ["CONSENTGATE_CA"]
    api = business_api_client.EventCallbackApi(business_api_client.ApiClient(cfg))

    def event(email, phone):
        return {
            "event": "CompletePayment",
            "event_id": "evt-%d" % abs(hash(email)),
            "timestamp": "2026-11-20T10:00:00Z",
            "context": {
                "user": {"email": email, "phone_number": phone},
                "page": {"url": "https://hospital.example/book"},
                "ip": "203.0.113.7",
                "user_agent": "Mozilla/5.0",
            },
        }

    def send():
        if len(people) == 1:
            body = {"pixel_code": "C0SDKSUITE"}
            body.update(event(*people[0]))
            api.pixel_track("sdk-suite-token", body=body)
        else:
            api.pixel_batch(
                "sdk-suite-token",
                body={"pixel_code": "C0SDKSUITE", "batch": [event(e, p) for e, p in people]},
            )

    def message_of(e):
        # TikTok answers errors with HTTP 200 and a non-zero `code`; the SDK
        # raises its own TiktokSDKError("Error Code: …, message: …") for those.
        if isinstance(e, TiktokSDKError):
            return str(e), None
        if isinstance(e, ApiException):
            # str(ApiException) is "(status)\nReason: ...\nHTTP response body: ..."
            body = e.body.decode("utf-8", "replace") if isinstance(e.body, bytes) else str(e.body)
            return body, e.status
        return repr(e), None

    return [outcome_of(send, message_of)]


SDKS = {"meta": meta, "twilio": twilio, "sendgrid": sendgrid, "mandrill": mandrill, "tiktok": tiktok}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SDKS or sys.argv[2] not in PEOPLE:
        sys.stderr.write("usage: sdk_py.py {%s} {%s}\n" % ("|".join(SDKS), "|".join(PEOPLE)))
        return 2
    calls = SDKS[sys.argv[1]](PEOPLE[sys.argv[2]])
    print(json.dumps({"calls": calls}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
