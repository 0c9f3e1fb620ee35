// Drives one Node vendor SDK for the SDK compatibility suite (tests/sdk_compat.rs).
//
// Usage: node sdk_node.js SDK CASE, where SDK is twilio | sendgrid | meta and CASE
// is granted | denied | mixed. Same contract as sdk_py.py: one JSON line
// {"calls": [outcome, ...]} on stdout; an outcome is {"ok": true} or
// {"ok": false, "exc_type", "sdk_message", "status"}. Routing and trust come from
// the environment tests/sdk_compat.rs sets for each SDK (docs/SDKS.md):
// twilio-node reads only HTTP_PROXY (an https-proxy-agent it builds itself) and
// trusts through NODE_EXTRA_CA_CERTS (its TWILIO_CA_BUNDLE is not applied to the
// proxy agent); @sendgrid/client and the Meta SDK use axios, which tunnels
// through HTTPS_PROXY with CONNECT.
'use strict';

// Fixture patients: P-1001 every category granted, P-1002 every one denied,
// and an address that names nobody.
const GRANTED = ['jane.roe@example.com', '+14155550100'];
const DENIED = ['deny.me@example.com', '+14155550102'];
const UNKNOWN = ['unknown.person@example.com', '+15555550199'];
const PEOPLE = {
  granted: [GRANTED],
  denied: [DENIED],
  mixed: [GRANTED, DENIED, UNKNOWN],
};

async function outcomeOf(call, messageOf) {
  try {
    await call();
    return { ok: true };
  } catch (e) {
    let msg;
    let status = null;
    try {
      [msg, status] = messageOf(e);
    } catch (inner) {
      msg = String(e);
    }
    const name = e && e.constructor ? e.constructor.name : typeof e;
    return { ok: false, exc_type: name, sdk_message: msg === undefined ? null : msg, status };
  }
}

async function twilio(people) {
  const twilioSdk = require('twilio');
  const RestException = require('twilio/lib/base/RestException').default;
  const client = twilioSdk('AC' + '0'.repeat(32), 'sdk-suite-token');
  const messageOf = (e) => (e instanceof RestException ? [e.message, e.status] : [String(e), null]);
  const out = [];
  // One recipient per Messages call, so "mixed" is one call per person.
  for (const [, phone] of people) {
    out.push(
      await outcomeOf(
        () => client.messages.create({ to: phone, from: '+15005550006', body: 'Your appointment is tomorrow at 9.' }),
        messageOf,
      ),
    );
  }
  return out;
}

async function sendgrid(people) {
  const sgMail = require('@sendgrid/mail');
  const { ResponseError } = require('@sendgrid/helpers').classes;
  sgMail.setApiKey('SG.sdk-suite-key');
  const msg = {
    from: 'clinic@hospital.example',
    subject: 'Flu shots are here',
    text: 'Book yours today.',
    personalizations: people.map(([email]) => ({ to: [{ email }] })),
  };
  // ResponseError.message is only the status text; toString() adds each
  // errors[].message, field and help from the body.
  const messageOf = (e) => (e instanceof ResponseError ? [e.toString(), e.code] : [String(e), null]);
  return [await outcomeOf(() => sgMail.send(msg), messageOf)];
}

async function meta(people) {
  const biz = require('facebook-nodejs-business-sdk');
  const events = people.map(([email, phone]) =>
    new biz.ServerEvent()
      .setEventName('Purchase')
      .setEventTime(Math.floor(Date.now() / 1000))
      .setActionSource('website')
      .setUserData(new biz.UserData().setEmails([email]).setPhones([phone])),
  );
  // The SDK exports no error class; its errors carry name 'FacebookRequestError'.
  const messageOf = (e) =>
    e && e.name === 'FacebookRequestError' ? [e.message, e.status] : [String(e), null];
  return [
    await outcomeOf(
      () => new biz.EventRequest('sdk-suite-token', '1234567890').setEvents(events).execute(),
      messageOf,
    ),
  ];
}

const SDKS = { twilio, sendgrid, meta };

async function main() {
  const [sdk, kase] = process.argv.slice(2);
  if (!SDKS[sdk] || !PEOPLE[kase]) {
    process.stderr.write(`usage: sdk_node.js {${Object.keys(SDKS).join('|')}} {${Object.keys(PEOPLE).join('|')}}\n`);
    process.exit(2);
  }
  const calls = await SDKS[sdk](PEOPLE[kase]);
  process.stdout.write(JSON.stringify({ calls }) + '\n');
}

main().catch((e) => {
  process.stderr.write(`sdk_node.js: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
